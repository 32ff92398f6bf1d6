"""A bounded loopback load test: steady job submissions and status polls against a live API.

With ``url=None`` it builds the production shape on this machine and tears it down afterwards: a
throwaway PostgreSQL database on 127.0.0.1:5432, a Redis database number of its own on
127.0.0.1:6379, one Celery worker process and uvicorn serving ``create_app`` on a free loopback
port. Requests are scheduled open-loop at ``rate`` per second (half submissions of noop jobs with
one zero-length step, half status polls of jobs already submitted), so a slow server shows up as
latency and lateness rather than as a politely lower rate.

>>> run_load_benchmark(None, seconds=2, rate=10)["errors"]  # doctest: +SKIP
0
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PG_ADMIN_URL = os.environ.get("CELLFUSE_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CELLFUSE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
SUBMIT = "POST /api/v1/jobs/noop"
POLL = "GET /api/v1/jobs/{id}"
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class _Samples:
    latencies_s: dict[str, list[float]] = field(default_factory=lambda: {SUBMIT: [], POLL: []})
    errors: list[str] = field(default_factory=list)
    lateness_s: list[float] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


@contextmanager
def local_stack(echo: Callable[[str], Any] = print, embedded: bool = False):
    """A worker and uvicorn on loopback; yields (base URL, admin key).

    ``embedded=False``: a throwaway PostgreSQL database and a Redis database of its own (production
    shape). ``embedded=True``: the embedded default, SQLite and the SQLite broker in a temporary
    data directory (what `cellfuse serve` runs with no configuration).
    """
    from app.db import session_factory
    from app.migrations import upgrade
    from app.security import create_key

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cellfuse-load-")))
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELLFUSE_")}
        env.update(CELLFUSE_DATA_DIR=str(tmp / "data"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        if embedded:
            from app.settings import Settings

            database_url = Settings(data_dir=tmp / "data").resolved_database_url
            (tmp / "data").mkdir()
            where = "embedded default (SQLite database and broker)"
        else:
            database_url = stack.enter_context(_services(env))
            where = f"PostgreSQL + Redis {REDIS_URL}"
        upgrade(database_url)
        with session_factory(database_url)() as session:
            _row, key = create_key(session, "load-benchmark", "admin")
        worker_log = (tmp / "worker.log").open("wb")
        stack.callback(worker_log.close)
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "workers.celery_app:celery_app",
                "worker",
                "-Q",
                "cpu,gpu",
                "--concurrency",
                "1",
                "--pool",
                "prefork",
                "--loglevel",
                "WARNING",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-n",
                f"load-{uuid.uuid4().hex[:6]}@%h",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stack.callback(_stop, worker)
        port = _free_port()
        api_log = (tmp / "api.log").open("wb")
        stack.callback(api_log.close)
        api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.api.main:create_app",
                "--factory",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=api_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stack.callback(_stop, api)
        base = f"http://127.0.0.1:{port}"
        _wait_http(base + "/health", api, timeout=60)
        echo(f"local stack: API {base}, {where}, 1 worker")
        yield base, key


@contextmanager
def _services(env: dict[str, str]):
    """A throwaway PostgreSQL database and a flushed Redis database; sets their URLs in ``env``."""
    import redis
    from sqlalchemy import create_engine, text

    with ExitStack() as stack:
        db_name = f"cellfuse_load_{uuid.uuid4().hex[:10]}"
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{db_name}"'))  # a generated name, never user input
        database_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{db_name}"

        def drop_database() -> None:
            from app.db import engine_for

            engine_for(database_url).dispose()
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
            admin.dispose()

        stack.callback(drop_database)
        broker = redis.Redis.from_url(REDIS_URL)
        broker.flushdb()
        stack.callback(broker.close)
        stack.callback(broker.flushdb)
        env.update(CELLFUSE_DATABASE_URL=database_url, CELLFUSE_BROKER_URL=REDIS_URL)
        yield database_url


def _drive(base: str, key: str, seconds: float, rate: float, samples: _Samples, concurrency: int) -> float:
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=30.0)
        return local.client

    def one(kind: str, scheduled: float) -> None:
        started = time.perf_counter()
        try:
            if kind == SUBMIT:
                response = client().post("/api/v1/jobs/noop", json={"steps": 1, "step_seconds": 0})
                ok = response.status_code == 202
                if ok:
                    with samples.lock:
                        samples.job_ids.append(response.json()["id"])
            else:
                with samples.lock:
                    job_id = random.choice(samples.job_ids[-50:]) if samples.job_ids else None
                if job_id is None:
                    response = client().get("/api/v1/jobs", params={"limit": 1})
                else:
                    response = client().get(f"/api/v1/jobs/{job_id}")
                ok = response.status_code == 200
            if not ok:
                samples.errors.append(f"{kind}: HTTP {response.status_code} {response.text[:200]}")
        except httpx.HTTPError as exc:
            samples.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
        finally:
            done = time.perf_counter()
            with samples.lock:
                samples.latencies_s[kind].append(done - started)
                samples.lateness_s.append(started - scheduled)

    interval = 1.0 / rate
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="load") as pool:
        start = time.perf_counter()
        i = 0
        while True:
            scheduled = start + i * interval
            if scheduled - start >= seconds:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, SUBMIT if i % 2 == 0 else POLL, scheduled)
            i += 1
    return time.perf_counter() - start


def _drain(base: str, key: str, job_ids: list[str], timeout: float) -> tuple[int, int, float]:
    """Wait for submitted jobs to finish; -> (succeeded, not finished, seconds waited)."""
    started = time.perf_counter()
    pending = set(job_ids)
    succeeded = 0
    with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=30.0) as client:
        while pending and time.perf_counter() - started < timeout:
            for job_id in [j for j in job_ids if j in pending]:
                status = client.get(f"/api/v1/jobs/{job_id}").json().get("status")
                if status in ("succeeded", "failed", "cancelled"):
                    pending.discard(job_id)
                    succeeded += status == "succeeded"
                else:
                    break  # the oldest is not done: the rest are not either (one FIFO worker)
            if pending:
                time.sleep(0.5)
    return succeeded, len(pending), time.perf_counter() - started


def run_load_benchmark(
    url: str | None, seconds: float, rate: float, echo: Callable[[str], Any] = print, embedded: bool = False
) -> dict[str, Any]:
    """Drive ``rate`` requests/s for ``seconds`` and report throughput, p50/p99 latency and errors.

    ``url`` is a running API (its key in ``CELLFUSE_API_KEY``); ``None`` starts a local stack on
    loopback (PostgreSQL + Redis, or the embedded default with ``embedded``) and removes it after.
    """
    if seconds <= 0 or rate <= 0:
        raise ValueError("seconds and rate must be positive")
    concurrency = max(4, min(64, int(rate)))
    with ExitStack() as stack:
        if url is None:
            base, key = stack.enter_context(local_stack(echo, embedded=embedded))
        else:
            base, key = url.rstrip("/"), os.environ.get("CELLFUSE_API_KEY", "")
            if not key:
                raise ValueError("set CELLFUSE_API_KEY to an API key of the server at --url")
        echo(f"driving {rate:g} requests/s for {seconds:g} s ({SUBMIT} and {POLL}, alternating)")
        samples = _Samples()
        elapsed = _drive(base, key, seconds, rate, samples, concurrency)
        succeeded, unfinished, drain_s = _drain(base, key, list(samples.job_ids), timeout=max(30.0, seconds * 3))

    total = sum(len(v) for v in samples.latencies_s.values())
    report: dict[str, Any] = {
        "url": url
        or (
            "local stack (embedded default: SQLite + SQLite broker + 1 worker + uvicorn)"
            if embedded
            else "local stack (PostgreSQL + Redis + 1 worker + uvicorn)"
        ),
        "seconds": round(elapsed, 2),
        "target_rate": rate,
        "requests": total,
        "requests_per_s": round(total / elapsed, 2) if elapsed else 0.0,
        "errors": len(samples.errors),
        "first_errors": samples.errors[:5],
        "p99_lateness_ms": round(_percentile(samples.lateness_s, 99) * 1000, 1),
        "jobs_submitted": len(samples.job_ids),
        "jobs_succeeded": succeeded,
        "jobs_unfinished": unfinished,
        "drain_s": round(drain_s, 2),
        "endpoints": {
            name: {
                "count": len(values),
                "p50_ms": round(_percentile(values, 50) * 1000, 1),
                "p99_ms": round(_percentile(values, 99) * 1000, 1),
                "max_ms": round(max(values) * 1000, 1) if values else float("nan"),
            }
            for name, values in samples.latencies_s.items()
        },
    }
    echo(
        f"requests: {total} in {report['seconds']} s = {report['requests_per_s']} requests/s "
        f"(target {rate:g}); scheduling lateness p99 {report['p99_lateness_ms']} ms"
    )
    for name, stats in report["endpoints"].items():
        echo(
            f"  {name:28s} n={stats['count']:5d}  p50 {stats['p50_ms']:7.1f} ms  p99 {stats['p99_ms']:7.1f} ms  "
            f"max {stats['max_ms']:7.1f} ms"
        )
    echo(
        f"jobs: {len(samples.job_ids)} submitted, {succeeded} succeeded, {unfinished} unfinished "
        f"(drained in {report['drain_s']} s after the load stopped)"
    )
    echo(f"errors: {report['errors']}")
    for line in report["first_errors"]:
        echo(f"  {line}")
    return report
