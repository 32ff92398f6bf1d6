"""Fixtures for tests of the service: settings on the embedded default or on PostgreSQL + Redis,
a real Celery worker process, and an API client.

PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) tests skip with a reason when those servers
are not running, unless CELLFUSE_TEST_SERVICES=required (CI), where a missing server is a failure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text

from app.db import session_factory
from app.migrations import upgrade
from app.models import WorkerHeartbeat
from app.security import create_key
from app.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES_REQUIRED = os.environ.get("CELLFUSE_TEST_SERVICES", "").lower() == "required"
PG_ADMIN_URL = os.environ.get("CELLFUSE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_BASE_URL = os.environ.get("CELLFUSE_TEST_REDIS_URL", "redis://127.0.0.1:6379")

#: Fast timings so that fault tests finish in seconds.
FAST_JOB_TIMINGS = dict(job_heartbeat_s=0.5, job_stale_after_s=4.0, reaper_interval_s=0.5, job_resend_after_s=6.0)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    if _port_open(host, port):
        return
    message = f"{name} is not running on {host}:{port}"
    if SERVICES_REQUIRED:
        pytest.fail(message + " (CELLFUSE_TEST_SERVICES=required)")
    pytest.skip(message)


def settings_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLFUSE_")}
    env.update(
        {
            "CELLFUSE_DATA_DIR": str(settings.resolved_data_dir),
            "CELLFUSE_DATABASE_URL": settings.resolved_database_url,
            "CELLFUSE_BROKER_URL": settings.resolved_broker_url,
            "CELLFUSE_JOB_HEARTBEAT_S": str(settings.job_heartbeat_s),
            "CELLFUSE_JOB_STALE_AFTER_S": str(settings.job_stale_after_s),
            "CELLFUSE_REAPER_INTERVAL_S": str(settings.reaper_interval_s),
            "CELLFUSE_JOB_RESEND_AFTER_S": str(settings.job_resend_after_s),
            "CELLFUSE_JOB_MAX_ATTEMPTS": str(settings.job_max_attempts),
            "CELLFUSE_CHECKPOINT_INTERVAL_S": str(settings.checkpoint_interval_s),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    # Every other setting a test changed reaches the worker too (e.g. segment_block_pixels).
    import json as _json

    from pydantic import SecretStr

    for name in settings.model_fields_set:
        key = f"CELLFUSE_{name.upper()}"
        if key in env:
            continue
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, (list, tuple)):
            env[key] = _json.dumps([str(v) for v in value])
        elif isinstance(value, bool):
            env[key] = "true" if value else "false"
        elif value is not None:
            env[key] = str(value)
    return env


def make_embedded_settings(tmp_path: Path, **overrides) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", **{**FAST_JOB_TIMINGS, **overrides})
    upgrade(settings.resolved_database_url)
    return settings


@pytest.fixture
def embedded_settings(tmp_path) -> Settings:
    return make_embedded_settings(tmp_path)


@pytest.fixture
def engine_starts(monkeypatch) -> list[int]:
    """One entry per start of the plate engine (in this process): proof of the route a segmentation took."""
    import app.science.plate as plate

    starts: list[int] = []
    real = plate.segment_fields

    def counted(*args, **kwargs):
        starts.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(plate, "segment_fields", counted)
    return starts


@pytest.fixture
def pg_url() -> Iterator[str]:
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"cellfuse_t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        from app.db import engine_for

        engine_for(url).dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def redis_url() -> Iterator[str]:
    require_service("Redis", "127.0.0.1", 6379)
    import redis

    # A database number of its own per test run; flushed before and after.
    db = 5 + (os.getpid() % 10)
    url = f"{REDIS_BASE_URL}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture
def services_settings(tmp_path, pg_url, redis_url) -> Settings:
    settings = Settings(data_dir=tmp_path / "data", database_url=pg_url, broker_url=redis_url, **FAST_JOB_TIMINGS)
    upgrade(settings.resolved_database_url)
    return settings


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    log_path: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_worker(settings: Settings, log_path: Path, queues: str = "gpu,cpu", timeout: float = 90.0) -> WorkerProcess:
    log_file = log_path.open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app:celery_app",
            "worker",
            "-Q",
            queues,
            "--concurrency",
            "1",
            "--pool",
            "prefork",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-n",
            f"test-{uuid.uuid4().hex[:6]}@%h",
        ],
        cwd=REPO_ROOT,
        env=settings_env(settings),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    worker = WorkerProcess(proc, log_path)
    factory = session_factory(settings.resolved_database_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{worker.log()[-3000:]}")
        with factory() as session:
            if session.scalars(select(WorkerHeartbeat)).first() is not None:
                return worker
        time.sleep(0.3)
    worker.kill()
    raise RuntimeError(f"worker did not come up in {timeout} s:\n{worker.log()[-3000:]}")


@pytest.fixture
def worker_factory(tmp_path) -> Iterator:
    started: list[WorkerProcess] = []

    def _start(settings: Settings, **kwargs) -> WorkerProcess:
        worker = start_worker(settings, tmp_path / f"worker-{len(started)}.log", **kwargs)
        started.append(worker)
        return worker

    yield _start
    for worker in started:
        worker.kill()


def make_client(settings: Settings, *, role: str = "admin", run_reaper: bool = True) -> tuple[TestClient, str]:
    from app.api.main import create_app

    with session_factory(settings.resolved_database_url)() as session:
        _row, key = create_key(session, f"test-{role}", role)
    client = TestClient(create_app(settings, run_reaper=run_reaper), raise_server_exceptions=False)
    client.headers["X-API-Key"] = key
    return client, key


def wait_for_job(
    client: TestClient, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout: float = 120.0
) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/jobs/{job_id}").json()
        if body.get("status") in statuses:
            return body
        time.sleep(0.25)
    raise AssertionError(f"job {job_id} did not reach {statuses} in {timeout} s; last: {body}")
