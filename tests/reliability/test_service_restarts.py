"""Redis and PostgreSQL killed and restarted under a running API and worker.

Each test runs servers of its own (a redis-server / a PostgreSQL cluster on a free loopback port),
never the shared ones that other tests use.
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.api.main import create_app
from app.db import session_factory
from app.migrations import upgrade
from app.models import JobResult
from app.security import create_key
from app.settings import Settings
from tests.reliability.conftest import FAST_JOB_TIMINGS
from tests.service.conftest import wait_for_job

PROBLEM = "application/problem+json"


def _live_client(settings: Settings) -> TestClient:
    with session_factory(settings.resolved_database_url)() as session:
        _row, key = create_key(session, "restart-test", "admin")
    client = TestClient(create_app(settings), raise_server_exceptions=False)
    client.headers["X-API-Key"] = key
    return client


def _eventually(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"{what} did not happen in {timeout} s (last: {last})")


def _one_result_each(settings: Settings, job_ids: list[str]) -> None:
    with session_factory(settings.resolved_database_url)() as session:
        for job_id in job_ids:
            rows = session.scalars(select(JobResult).where(JobResult.job_id == job_id)).all()
            assert len(rows) == 1, (job_id, rows)


@pytest.mark.slow
@pytest.mark.services
def test_redis_killed_with_jobs_queued_and_running_loses_no_job(tmp_path, pg_url, own_redis, worker_factory):
    settings = Settings(data_dir=tmp_path / "data", database_url=pg_url, broker_url=own_redis.url, **FAST_JOB_TIMINGS)
    upgrade(settings.resolved_database_url)
    worker = worker_factory(settings)
    with _live_client(settings) as client:
        running = client.post("/api/v1/jobs/noop", json={"steps": 20, "step_seconds": 0.2}).json()["id"]
        queued = [client.post("/api/v1/jobs/noop", json={"steps": 1, "step_seconds": 0}).json()["id"] for _ in range(3)]
        wait_for_job(client, running, statuses=("running",), timeout=60)

        own_redis.kill()  # SIGKILL; it keeps nothing on disk: every queued message is gone
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["broker"]["ok"] is False
        assert ready.json()["checks"]["database"]["ok"] is True
        assert client.get("/health").status_code == 200
        assert client.get(f"/api/v1/jobs/{running}").status_code == 200  # job state is in the database
        started = time.monotonic()
        during = client.post("/api/v1/jobs/noop", json={"steps": 1, "step_seconds": 0})
        assert during.status_code == 202 and during.json()["status"] == "queued"  # accepted, sent later
        assert time.monotonic() - started < 20
        time.sleep(1.0)

        own_redis.start()  # same port, empty
        all_jobs = [running, *queued, during.json()["id"]]
        for job_id in all_jobs:
            job = wait_for_job(client, job_id, timeout=90)
            assert job["status"] == "succeeded", job
            assert job["attempts"] == 1, job  # re-sent, not re-run
        _one_result_each(settings, all_jobs)
        _eventually(lambda: client.get("/ready").status_code == 200, 30, "/ready back to 200")
        # The worker reconnected by itself (same process) and takes new work straight away.
        assert worker.proc.poll() is None
        fresh = client.post("/api/v1/jobs/noop", json={"steps": 1, "step_seconds": 0}).json()
        assert wait_for_job(client, fresh["id"], timeout=30)["status"] == "succeeded"


@pytest.mark.slow
@pytest.mark.services
def test_postgresql_restart_is_survived_by_api_and_worker(tmp_path, own_postgres, redis_url, worker_factory):
    # A worker rides out an outage for up to job_stale_after_s (its retry window; 60 s by default).
    # The fast test timings' 4 s were shorter than a crash restart of PostgreSQL on a loaded 2-core
    # machine, which then failed 'attempts == 1' now and then: 30 s is still half the default.
    timings = {**FAST_JOB_TIMINGS, "job_stale_after_s": 30.0}
    settings = Settings(data_dir=tmp_path / "data", database_url=own_postgres.url, broker_url=redis_url, **timings)
    upgrade(settings.resolved_database_url)
    worker = worker_factory(settings)
    with _live_client(settings) as client:
        job_id = client.post("/api/v1/jobs/noop", json={"steps": 30, "step_seconds": 0.2}).json()["id"]
        wait_for_job(client, job_id, statuses=("running",), timeout=60)

        own_postgres.stop("immediate")  # a crash: no clean shutdown, every connection cut
        response = client.get(f"/api/v1/jobs/{job_id}")
        assert response.status_code == 503 and response.headers["content-type"].startswith(PROBLEM)
        assert response.headers["retry-after"] and "database" in response.json()["detail"]
        assert client.get("/ready").status_code == 503
        assert client.get("/health").status_code == 200
        time.sleep(1.5)
        own_postgres.start()

        # Neither the API nor the worker is restarted: both reconnect on their own.
        _eventually(lambda: client.get(f"/api/v1/jobs/{job_id}").status_code == 200, 20, "API reconnect")
        job = wait_for_job(client, job_id, timeout=90)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1, job  # the worker rode out the outage at its checkpoints
        after = client.post("/api/v1/jobs/noop", json={"steps": 2, "step_seconds": 0}).json()["id"]
        assert wait_for_job(client, after, timeout=60)["status"] == "succeeded"
        _one_result_each(settings, [job_id, after])
        _eventually(lambda: client.get("/ready").status_code == 200, 30, "/ready back to 200")
        assert worker.proc.poll() is None
