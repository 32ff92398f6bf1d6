"""Worker faults with real processes: a worker SIGKILLed in the middle of a fine-tune, and the same
job delivered twice to two workers at once.

The fine-tune is the long-running job kind here (a tiny CPnet on 64-pixel crops, so that the kill
lands in the training loop within seconds); noop jobs cover the same path in tests/service.
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app import jobs
from app.api.main import create_app
from app.client import CellFuseClient
from app.db import session_factory
from app.models import JobResult, ModelAlias, ModelVersion
from app.settings import Settings
from tests.reliability.conftest import FAST_JOB_TIMINGS, make_client
from tests.service.conftest import make_embedded_settings, wait_for_job
from tests.service.workflow import register_tiny_base, small_plate, upload_dataset

SPLITS = ["train", "train", "val", "test"]
TRAINING = {"max_epochs": 15, "min_epochs": 15, "patience": 15, "batch_size": 2, "bsize": 64}


def _submit_finetune(client) -> str:
    api = CellFuseClient(client)
    base = register_tiny_base(api)
    fields = small_plate(4, size=64)
    ds = upload_dataset(api, fields, splits=SPLITS)
    body = {
        "dataset_id": ds["id"],
        "reporter": fields[0].channel_names[0],
        "object": "nuclei",
        "base": base,
        "params": TRAINING,
    }
    response = client.post("/api/v1/jobs/finetune", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _wait_for_training(client, job_id: str, epoch: int = 2, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        assert job["status"] in ("queued", "running"), job
        if job["stage"].startswith("training: epoch") and int(job["stage"].split()[2]) >= epoch:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not reach training epoch {epoch}: {job}")


def _versions(settings: Settings, job_id: str) -> list[ModelVersion]:
    with session_factory(settings.resolved_database_url)() as session:
        return list(session.scalars(select(ModelVersion).where(ModelVersion.job_id == job_id)))


@pytest.mark.slow
def test_worker_sigkilled_mid_finetune_is_rerun_and_nothing_partial_is_ready(tmp_path, worker_factory):
    settings = make_embedded_settings(tmp_path, job_max_attempts=2)
    worker = worker_factory(settings)
    client, _ = make_client(settings)
    job_id = _submit_finetune(client)
    running = _wait_for_training(client, job_id)
    worker.kill()  # SIGKILL to the worker's process group: main process and pool child
    # Mid-training: the version exists but is not ready; nothing is presented as a finished model.
    [version] = _versions(settings, job_id)
    assert version.status == "training" and version.weights_sha256 is None
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "running" and job["attempts"] == 1
    assert [r["name"] for r in job["results"]] == [] or job["status"] != "succeeded"
    assert client.get("/api/v1/models", params={"status": "ready"}).json() == []

    worker_factory(settings)  # its reaper sees the stale heartbeat, re-queues and re-runs the job
    job = wait_for_job(client, job_id, timeout=240)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2 and job["worker"] != running["worker"]
    [version] = _versions(settings, job_id)  # the re-run reused the row, no orphan version
    assert version.status == "ready" and version.weights_sha256
    curve = job["summary"]["training_curve"]
    epochs = [p["epoch"] for p in curve]
    assert epochs == list(range(epochs[0], epochs[0] + len(curve))) and epochs[0] in (0, 1)  # one run, not two spliced
    names = [r["name"] for r in job["results"]]
    assert len(names) == len(set(names))


@pytest.mark.slow
def test_finetune_killed_on_its_last_attempt_fails_with_the_reason(tmp_path, worker_factory):
    settings = make_embedded_settings(tmp_path, job_max_attempts=1)
    worker = worker_factory(settings)
    client, _ = make_client(settings)
    job_id = _submit_finetune(client)
    _wait_for_training(client, job_id, epoch=1)
    worker.kill()
    with TestClient(create_app(settings)) as live:  # the API's own reaper; no worker is running
        live.headers.update(client.headers)
        job = wait_for_job(live, job_id, timeout=60)
    assert job["status"] == "failed"
    assert "stopped answering during 'training: epoch" in job["error"] and "1 attempts" in job["error"]
    [version] = _versions(settings, job_id)
    assert version.status == "failed"  # not 'training' forever, and never 'ready'
    with session_factory(settings.resolved_database_url)() as session:
        assert session.scalars(select(ModelAlias)).all() == []


@pytest.mark.slow
@pytest.mark.services
def test_duplicate_delivery_runs_the_work_once(tmp_path, pg_url, redis_url, worker_factory):
    from app.migrations import upgrade
    from workers.celery_app import send_job

    settings = Settings(data_dir=tmp_path / "data", database_url=pg_url, broker_url=redis_url, **FAST_JOB_TIMINGS)
    upgrade(settings.resolved_database_url)
    first, second = worker_factory(settings), worker_factory(settings)
    factory = session_factory(settings.resolved_database_url)
    with factory() as session:
        job, _ = jobs.create_job(session, "noop", {"steps": 10, "step_seconds": 0.2}, max_attempts=3)
        session.commit()
        job_id = job.id
    # Two messages for the same job at once: both workers are idle, each takes one.
    send_job(job_id, "noop", settings)
    send_job(job_id, "noop", settings)
    client, _ = make_client(settings)
    wait_for_job(client, job_id, statuses=("running",), timeout=60)
    send_job(job_id, "noop", settings)  # a third while it runs (a redelivery)
    done = wait_for_job(client, job_id, timeout=60)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    send_job(job_id, "noop", settings)  # and a fourth after it finished
    time.sleep(3)
    with factory() as session:
        job = session.get(jobs.Job, job_id)
        assert job.attempts == 1 and job.status == "succeeded"
        assert job.finished_at.isoformat() == done["finished_at"].replace("Z", "+00:00")
        assert len(session.scalars(select(JobResult).where(JobResult.job_id == job_id)).all()) == 1
    logs = first.log() + second.log()
    assert logs.count("'succeeded'") == 1, logs[-3000:]
    assert logs.count("'skipped'") == 3, logs[-3000:]
