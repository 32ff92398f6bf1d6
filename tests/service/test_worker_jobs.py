"""Jobs submitted over HTTP run on a real Celery worker process: embedded broker and Redis."""

import time

import pytest

from tests.service.conftest import make_client, make_embedded_settings, wait_for_job


def _run_noop_job(settings, worker_factory):
    worker_factory(settings)
    client, _ = make_client(settings)
    response = client.post("/api/v1/jobs/noop", json={"steps": 3, "step_seconds": 0.1})
    assert response.status_code == 202
    job = wait_for_job(client, response.json()["id"], timeout=90)
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["attempts"] == 1 and job["worker"]
    assert job["started_at"] and job["finished_at"]
    [result] = job["results"]
    download = client.get(result["url"])
    assert download.status_code == 200 and download.json() == {"ok": True}
    assert download.headers["x-content-sha256"] == result["sha256"]
    ready = client.get("/ready")
    assert ready.status_code == 200, ready.json()
    assert ready.json()["checks"]["workers"]["count"] >= 1


@pytest.mark.slow
def test_noop_job_on_embedded_broker(embedded_settings, worker_factory):
    _run_noop_job(embedded_settings, worker_factory)


@pytest.mark.slow
@pytest.mark.services
def test_noop_job_on_redis_and_postgresql(services_settings, worker_factory):
    _run_noop_job(services_settings, worker_factory)


@pytest.mark.slow
def test_failing_job_reports_its_reason(embedded_settings, worker_factory):
    worker_factory(embedded_settings)
    client, _ = make_client(embedded_settings)
    job_id = client.post("/api/v1/jobs/noop", json={"steps": 1, "step_seconds": 0, "fail": True}).json()["id"]
    job = wait_for_job(client, job_id)
    assert job["status"] == "failed"
    assert job["error"] == "this noop job was asked to fail"


@pytest.mark.slow
def test_cancel_a_running_job_stops_it_at_a_checkpoint(embedded_settings, worker_factory):
    worker_factory(embedded_settings)
    client, _ = make_client(embedded_settings)
    job_id = client.post("/api/v1/jobs/noop", json={"steps": 200, "step_seconds": 0.1}).json()["id"]
    wait_for_job(client, job_id, statuses=("running",), timeout=60)
    client.post(f"/api/v1/jobs/{job_id}/cancel")
    job = wait_for_job(client, job_id, timeout=30)
    assert job["status"] == "cancelled"
    assert job["progress"] < 0.9


def _sigkill_mid_job(settings, worker_factory):
    worker = worker_factory(settings)
    client, _ = make_client(settings)
    job_id = client.post("/api/v1/jobs/noop", json={"steps": 40, "step_seconds": 0.1}).json()["id"]
    wait_for_job(client, job_id, statuses=("running",), timeout=60)
    time.sleep(0.5)
    worker.kill()  # SIGKILL to the whole worker (main process and pool child)
    # A fresh worker picks the job up again once its heartbeat is stale, and finishes it.
    worker_factory(settings)
    job = wait_for_job(client, job_id, timeout=120)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2


@pytest.mark.slow
def test_sigkilled_worker_job_is_rerun_embedded(embedded_settings, worker_factory):
    _sigkill_mid_job(embedded_settings, worker_factory)


@pytest.mark.slow
@pytest.mark.services
def test_sigkilled_worker_job_is_rerun_redis(services_settings, worker_factory):
    _sigkill_mid_job(services_settings, worker_factory)


@pytest.mark.slow
def test_job_fails_with_reason_after_max_attempts(tmp_path, worker_factory):
    settings = make_embedded_settings(tmp_path, job_max_attempts=1)
    worker = worker_factory(settings)
    client, _ = make_client(settings)
    job_id = client.post("/api/v1/jobs/noop", json={"steps": 100, "step_seconds": 0.1}).json()["id"]
    wait_for_job(client, job_id, statuses=("running",), timeout=60)
    worker.kill()
    # No worker is running now: the API's own reaper must notice (the client runs its lifespan).
    from fastapi.testclient import TestClient

    from app.api.main import create_app

    with TestClient(create_app(settings)) as live:
        live.headers.update(client.headers)
        job = wait_for_job(live, job_id, timeout=60)
    assert job["status"] == "failed"
    assert "stopped answering" in job["error"] and "1 attempts" in job["error"]
