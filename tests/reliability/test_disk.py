"""A full or read-only data directory: the API answers 507 with a problem a person can act on, no
partial blob is left, a worker fails the job with the same reason, and both recover once space is
back. The fault is real where this process may mount a tiny tmpfs (root in CI); elsewhere the
write is made to fail with ENOSPC in-process."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from app import jobs
from app.db import session_factory
from app.models import JobResult
from app.science.image_files import image_to_tiff_bytes
from tests.reliability.conftest import make_client

PROBLEM = "application/problem+json"


def _can_mount() -> bool:
    return os.geteuid() == 0 and subprocess.run(["which", "mount"], capture_output=True).returncode == 0


@contextmanager
def tiny_filesystem(path: Path, size_kb: int, monkeypatch, *, read_only: bool = False) -> Iterator[str]:
    """Mount a ``size_kb`` tmpfs on ``path`` (or simulate ENOSPC/EROFS when mounting is impossible)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kb}k" + (",ro" if read_only else "")
    mounted = (
        _can_mount()
        and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode
        == 0
    )
    if not mounted:
        code = errno.EROFS if read_only else errno.ENOSPC
        real_fsync = os.fsync

        def failing_fsync(fd):
            if str(path) in os.readlink(f"/proc/self/fd/{fd}"):
                raise OSError(code, os.strerror(code))
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", failing_fsync)
    try:
        yield "tmpfs" if mounted else "simulated"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)
        else:
            monkeypatch.undo()


def _field(seed: int) -> bytes:
    noisy = np.random.default_rng(seed).integers(0, 65535, (1, 256, 256), dtype=np.uint16)
    return image_to_tiff_bytes(noisy)  # ~120 kB: noise does not compress


def _dataset(client) -> int:
    client.post("/api/v1/cell-lines", json={"name": "HeLa"})
    client.post("/api/v1/reporters", json={"name": "GFP"})
    return client.post("/api/v1/datasets", json={"name": "d", "cell_line": "HeLa", "channels": ["GFP"]}).json()["id"]


def _upload(client, ds: int, data: bytes):
    return client.post(f"/api/v1/datasets/{ds}/images", files={"image": ("f.tif", data, "image/tiff")})


@pytest.mark.parametrize("read_only", [False, True], ids=["full", "read-only"])
def test_full_or_read_only_blob_store_is_a_507_and_leaves_no_partial_blob(embedded_settings, monkeypatch, read_only):
    client, _ = make_client(embedded_settings)
    ds = _dataset(client)
    blob_dir = embedded_settings.blob_dir
    data = _field(1)
    with tiny_filesystem(blob_dir, 64, monkeypatch, read_only=read_only):
        response = _upload(client, ds, data)
        assert response.status_code == 507, response.text
        assert response.headers["content-type"].startswith(PROBLEM)
        detail = response.json()["detail"]
        assert ("full" in detail and "free space" in detail) if not read_only else "not writable" in detail
        assert [p for p in blob_dir.rglob("*") if p.is_file()] == []  # no partial blob, no temp file
        assert client.get(f"/api/v1/datasets/{ds}").json()["images"] == []  # no row without its blob
        assert client.get("/health").status_code == 200
    # Space is back: the same upload works, and the stored blob is complete.
    response = _upload(client, ds, data)
    assert response.status_code == 201
    sha = response.json()["image_sha256"]
    from app.storage import BlobStore

    assert BlobStore(blob_dir).verify(sha) and BlobStore(blob_dir).read_bytes(sha) == data


def test_worker_with_a_full_jobs_folder_fails_the_job_with_the_reason(embedded_settings, monkeypatch):
    from workers.pipelines import pipeline_for
    from workers.runner import run_job

    factory = session_factory(embedded_settings.resolved_database_url)
    with factory() as session:
        job, _ = jobs.create_job(session, "noop", {"steps": 1, "step_seconds": 0})
        session.commit()
        job_id = job.id
    jobs_dir = embedded_settings.jobs_dir
    with tiny_filesystem(jobs_dir, 16, monkeypatch) as how:
        if how == "tmpfs":  # fill it to the last byte
            with open(jobs_dir / "filler", "wb", buffering=0) as filler:
                try:
                    while True:
                        filler.write(b"\0" * 4096)
                except OSError:
                    pass
        status = run_job(job_id, pipeline_for("noop"), embedded_settings, worker="test-worker")
        assert status == "failed"
        leftovers = [p for p in (jobs_dir / job_id).rglob("*") if p.is_file()] if (jobs_dir / job_id).exists() else []
        assert leftovers == []  # no half-written result file
    with factory() as session:
        job = session.get(jobs.Job, job_id)
        assert job.status == "failed" and "data directory is full" in job.error and "free space" in job.error
        assert session.scalars(select(JobResult).where(JobResult.job_id == job_id)).all() == []


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


@pytest.fixture
def data_on_tmpfs(tmp_path) -> Iterator[Path]:
    """A data directory that is a 4 MB tmpfs of its own (the database, blobs and jobs on it)."""
    if not _can_mount():
        pytest.skip("mounting a tmpfs needs root")
    path = tmp_path / "data"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("could not mount a tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_full_disk_under_sqlite_is_a_507_without_paths_and_ready_says_so(data_on_tmpfs):
    from tests.service.conftest import make_embedded_settings

    settings = make_embedded_settings(data_on_tmpfs.parent, min_free_disk_bytes=512 * 1024)
    client, _ = make_client(settings, run_reaper=False)
    assert client.get("/ready").json()["checks"]["disk"]["ok"] is True
    filler = _fill(data_on_tmpfs)
    response = client.post("/api/v1/cell-lines", json={"name": "HeLa", "notes": "x" * 4000})
    assert response.status_code == 507, response.text  # not 503 "database not reachable"
    assert response.headers["content-type"].startswith(PROBLEM)
    assert "full" in response.json()["detail"] and "free space" in response.json()["detail"]
    assert str(data_on_tmpfs) not in response.text and "/tmp" not in response.text
    ready = client.get("/ready")
    assert ready.status_code == 503 and ready.json()["checks"]["disk"]["ok"] is False
    assert "full" in ready.json()["checks"]["disk"]["error"]
    public = client.get("/ready", headers={"X-API-Key": ""})
    assert public.status_code == 503 and public.json() == {"status": "not ready"}
    filler.unlink()
    assert client.post("/api/v1/cell-lines", json={"name": "HeLa"}).status_code == 201
    assert client.get("/ready").json()["checks"]["disk"]["ok"] is True


def test_disk_full_while_a_job_runs_fails_it_with_the_reason(data_on_tmpfs):
    import threading
    import time

    from tests.service.conftest import make_embedded_settings
    from workers.pipelines import pipeline_for
    from workers.runner import run_job

    settings = make_embedded_settings(data_on_tmpfs.parent, job_stale_after_s=30.0)
    factory = session_factory(settings.resolved_database_url)
    with factory() as session:
        job, _ = jobs.create_job(session, "noop", {"steps": 400, "step_seconds": 0.05})
        session.commit()
        job_id = job.id
    outcome: list[str] = []
    noop = pipeline_for("noop")
    runner = threading.Thread(target=lambda: outcome.append(run_job(job_id, noop, settings, worker="w")))
    runner.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with factory() as session:
            if session.get(jobs.Job, job_id).stage.startswith("step 3"):
                break
        time.sleep(0.05)
    filler = _fill(data_on_tmpfs)
    time.sleep(2.0)  # the job hits the full disk at its next checkpoint
    filler.unlink()  # space comes back: the failure can be recorded
    runner.join(timeout=60)
    assert outcome == ["failed"], outcome
    with factory() as session:
        job = session.get(jobs.Job, job_id)
        assert job.status == "failed" and "full" in job.error and "free space" in job.error, job.error
        assert str(data_on_tmpfs) not in job.error
