"""Leftovers and leaks: temporary files of killed writes are cleaned, the first admin key is shown
once and never to a log, uint64 ids that would wrap and tiny fields are refused at upload, and a
cancelled job says its results are partial."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from app import jobs
from app.api.main import create_app
from app.db import session_factory
from app.models import JobResult
from app.science.image_files import image_to_tiff_bytes
from tests.reliability.conftest import make_client, seed_minimal_zoo
from tests.service.conftest import make_embedded_settings


def _tmp_file(folder, name: str, age_s: float):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(b"partial upload")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def test_blob_tmp_leftovers_are_cleaned_at_start_up_and_periodically(tmp_path):
    from app.reaper import reap_once

    settings = make_embedded_settings(tmp_path, tmp_max_age_s=600)
    tmp_dir = settings.blob_dir / "tmp"
    old = _tmp_file(tmp_dir, "upload-old", 3600)
    fresh = _tmp_file(tmp_dir, "upload-fresh", 5)
    with TestClient(create_app(settings, run_reaper=False)):
        pass  # start-up
    assert not old.exists() and fresh.exists()  # a young file may be a write in progress
    os.utime(fresh, (time.time() - 700, time.time() - 700))
    reap_once(settings)  # the periodic sweep (API and workers)
    assert not fresh.exists()


def test_uint64_mask_ids_that_would_wrap_are_refused(embedded_settings):
    import io

    client, _ = make_client(embedded_settings, run_reaper=False)
    seed_minimal_zoo(client, splits=())
    image = image_to_tiff_bytes(np.ones((1, 16, 16), np.uint16))
    for top, ok in ((2**63, False), (2**64 - 1, False), (2**63 - 1, True)):
        mask = np.zeros((16, 16), np.uint64)
        mask[2:5, 2:5] = top
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, mask)
        response = client.post(
            "/api/v1/datasets/1/images", files={"image": ("a.tif", image), "nuclei": ("m.tif", buffer.getvalue())}
        )
        if ok:
            assert response.status_code == 201, response.text
        else:
            assert response.status_code == 422, response.text
            assert "2**63" in response.json()["detail"] and "mask" in response.json()["detail"]
    assert len(client.get("/api/v1/datasets/1").json()["images"]) == 1


@pytest.mark.parametrize(
    "shape,ok", [((1, 1, 1), False), ((1, 15, 64), False), ((1, 64, 8), False), ((1, 16, 16), True)]
)
def test_tiny_fields_are_refused_at_upload_with_the_minimum(embedded_settings, shape, ok):
    client, _ = make_client(embedded_settings, run_reaper=False)
    seed_minimal_zoo(client, splits=())
    data = image_to_tiff_bytes(np.ones(shape, np.uint16))
    response = client.post("/api/v1/datasets/1/images", files={"image": ("f.tif", data)})
    if ok:
        assert response.status_code == 201, response.text
    else:
        assert response.status_code == 422, response.text
        assert response.json()["min_side"] == 16 and "at least 16×16" in response.json()["detail"]


def test_a_cancelled_job_says_its_results_are_partial(embedded_settings):
    client, _ = make_client(embedded_settings, run_reaper=False)
    job_id = client.post("/api/v1/jobs/noop", json={"steps": 1}).json()["id"]
    assert client.get(f"/api/v1/jobs/{job_id}").json()["partial_results"] is False
    factory = session_factory(embedded_settings.resolved_database_url)
    with factory() as session:  # a segmentation cancelled after its first field: one result stored
        assert jobs.claim(session, job_id, "w")
        session.add(
            JobResult(
                job_id=job_id,
                name="A01-1/nuclei.tif",
                kind="nuclei_mask",
                media_type="image/tiff",
                sha256="0" * 64,
                size_bytes=1,
            )
        )
        session.commit()
        jobs.finish(session, job_id, jobs.JobStatus.CANCELLED, error="cancelled by request", worker="w")
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["results"] and job["partial_results"] is True
    listed = client.get("/api/v1/jobs").json()["items"][0]
    assert listed["id"] == job_id and listed["partial_results"] is True


def test_first_admin_key_is_shown_once_and_never_to_a_log(tmp_path, monkeypatch):
    import uvicorn

    from app import cli
    from app.settings import get_settings

    monkeypatch.setenv("CELLFUSE_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    try:
        runner = CliRunner()
        first = runner.invoke(cli.cli, ["serve", "--no-embedded-worker"])
        assert first.exit_code == 0, first.output
        key = (tmp_path / "data" / cli.ADMIN_KEY_FILE).read_text().strip()
        assert key.startswith("cf_")
        assert key not in first.output  # stdout is not a terminal here (a log file, a pipe)
        assert cli.ADMIN_KEY_FILE in first.output
        second = runner.invoke(cli.cli, ["serve", "--no-embedded-worker"])
        assert second.exit_code == 0 and key not in second.output and cli.ADMIN_KEY_FILE not in second.output
    finally:
        get_settings.cache_clear()


def test_tiny_fields_are_refused_at_segment_submit(embedded_settings):
    """The issue's 1×1 fields were accepted by a segmentation and failed in the worker."""
    from app.client import CellFuseClient
    from tests.service.workflow import register_tiny_base

    client, _ = make_client(embedded_settings, run_reaper=False)
    register_tiny_base(CellFuseClient(client), name="tiny")
    assert client.post("/api/v1/cell-lines", json={"name": "L"}).status_code == 201
    request = '{"cell_line": "L", "channels": ["R"], "objects": ["nuclei"], "model": "base:tiny"}'
    fields = [
        ("files", ("ok.tif", image_to_tiff_bytes(np.ones((1, 32, 32), np.uint16)))),
        ("files", ("dot.tif", image_to_tiff_bytes(np.ones((1, 1, 1), np.uint16)))),
    ]
    response = client.post("/api/v1/jobs/segment", data={"request": request}, files=fields)
    assert response.status_code == 422, response.text
    assert response.json()["min_side"] == 16 and "dot.tif" in response.json()["detail"]
    assert client.get("/api/v1/jobs").json()["items"] == []  # no job queued
