"""Prometheus metrics for operators, read from the database and the broker at scrape time.

Everything that describes the service (queue depth, jobs by state, durations, throughput, workers,
GPU memory) is computed per scrape from the shared state, so every API replica answers the same
numbers and nothing is lost when a process restarts. HTTP request metrics are per process.

``prometheus-fastapi-instrumentator`` (the usual choice) pins ``starlette<1``, which this service's
FastAPI cannot use, so the HTTP part is a small middleware over ``prometheus_client`` itself.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta, timezone

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select, text

from app.db import session_factory
from app.models import Job, WorkerHeartbeat
from app.settings import Settings

log = logging.getLogger(__name__)

#: Job durations in seconds: from a noop (sub-second) to a long fine-tune (hours).
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
WORKER_FRESH_S = 30.0
THROUGHPUT_WINDOW_S = 300.0
DEFAULT_QUEUES = ("gpu", "cpu")


def _as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def queue_depths(settings: Settings) -> dict[str, int]:
    """Messages waiting per Celery queue: Redis list lengths, or the SQLAlchemy transport's table."""
    queues = list(dict.fromkeys([*settings.worker_queues, *DEFAULT_QUEUES]))
    url = settings.resolved_broker_url
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return {q: int(client.llen(q)) for q in queues}
        finally:
            client.close()
    if url.startswith("sqla+"):
        from app.db import engine_for

        depths = dict.fromkeys(queues, 0)
        engine = engine_for(url.removeprefix("sqla+"))
        with engine.connect() as conn:
            try:
                rows = conn.execute(
                    text(
                        "SELECT q.name, COUNT(m.id) FROM kombu_queue q LEFT JOIN kombu_message m "
                        "ON m.queue_id = q.id AND m.visible GROUP BY q.name"
                    )
                ).all()
            except Exception:  # no message sent yet: kombu creates its tables lazily
                rows = []
        depths.update({str(name): int(count) for name, count in rows})
        return depths
    return {}


class ServiceCollector:
    """A custom collector: one database pass per scrape."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def describe(self):
        return []  # collected lazily: registering must not touch the database

    def collect(self):
        factory = session_factory(self.settings.resolved_database_url)
        with factory() as session:
            yield from self._jobs(session)
            yield from self._workers(session)
        try:
            depths = queue_depths(self.settings)
        except Exception as exc:
            log.warning("queue depth unavailable: %s", exc)
            depths = {}
        depth = GaugeMetricFamily("cellfuse_queue_depth", "Messages waiting in each Celery queue", labels=["queue"])
        for queue, n in sorted(depths.items()):
            depth.add_metric([queue], n)
        yield depth

    def _jobs(self, session):
        by_state = GaugeMetricFamily("cellfuse_jobs", "Jobs by state and kind", labels=["state", "kind"])
        for state, kind, n in session.execute(
            select(Job.status, Job.kind, func.count()).group_by(Job.status, Job.kind)
        ).all():
            by_state.add_metric([state, kind], n)
        yield by_state

        durations: dict[tuple[str, str], list[float]] = {}
        stage_totals: dict[tuple[str, str], float] = {}
        fields_total: dict[str, float] = {}
        recent_fields = 0.0
        now = datetime.now(timezone.utc)
        window_start = now - timedelta(seconds=THROUGHPUT_WINDOW_S)
        rows = session.execute(
            select(Job.kind, Job.status, Job.started_at, Job.finished_at, Job.stage_timings, Job.summary).where(
                Job.finished_at.is_not(None)
            )
        ).all()
        for kind, status, started, finished, timings, summary in rows:
            started, finished = _as_utc(started), _as_utc(finished)
            if started is not None and finished is not None:
                durations.setdefault((kind, status), []).append(max(0.0, (finished - started).total_seconds()))
            for stage, seconds in (timings or {}).items():
                stage_totals[(kind, stage)] = stage_totals.get((kind, stage), 0.0) + float(seconds)
            done = (summary or {}).get("fields_done") if isinstance(summary, dict) else None
            if isinstance(done, (int, float)):
                fields_total[kind] = fields_total.get(kind, 0.0) + done
                if finished is not None and finished >= window_start:
                    recent_fields += done

        hist = HistogramMetricFamily(
            "cellfuse_job_duration_seconds", "Run time of finished jobs (start to end)", labels=["kind", "status"]
        )
        for (kind, status), values in sorted(durations.items()):
            buckets = [(str(b), sum(1 for v in values if v <= b)) for b in DURATION_BUCKETS]
            buckets.append(("+Inf", len(values)))
            hist.add_metric([kind, status], buckets, sum(values))
        yield hist

        stages = CounterMetricFamily(
            "cellfuse_job_stage_seconds", "Seconds spent per job stage (summed)", labels=["kind", "stage"]
        )
        for (kind, stage), seconds in sorted(stage_totals.items()):
            stages.add_metric([kind, stage[:80]], seconds)
        yield stages

        fields = CounterMetricFamily("cellfuse_fields_segmented", "Fields segmented by finished jobs", labels=["kind"])
        for kind, n in sorted(fields_total.items()):
            fields.add_metric([kind], n)
        yield fields
        yield GaugeMetricFamily(
            "cellfuse_fields_per_second",
            f"Fields segmented per second over the last {int(THROUGHPUT_WINDOW_S)} s (jobs finished in the window)",
            value=recent_fields / THROUGHPUT_WINDOW_S,
        )

    def _workers(self, session):
        fresh_after = datetime.now(timezone.utc) - timedelta(seconds=WORKER_FRESH_S)
        live = [w for w in session.scalars(select(WorkerHeartbeat)).all() if _as_utc(w.last_seen) >= fresh_after]
        count = GaugeMetricFamily("cellfuse_workers", "Live workers (fresh presence rows) per queue", labels=["queue"])
        per_queue: dict[str, int] = {}
        for w in live:
            for q in w.queues or []:
                per_queue[q] = per_queue.get(q, 0) + 1
        for q, n in sorted(per_queue.items()):
            count.add_metric([q], n)
        yield count
        yield GaugeMetricFamily("cellfuse_workers_total", "Live workers", value=len(live))
        gpu = GaugeMetricFamily(
            "cellfuse_gpu_memory_bytes", "GPU memory as the worker reports it", labels=["worker", "gpu", "kind"]
        )
        for w in live:
            info = w.info or {}
            for kind in ("allocated", "reserved", "total"):
                value = info.get(f"gpu_memory_{kind}")
                if isinstance(value, (int, float)):
                    gpu.add_metric([w.name, str(info.get("gpu_name") or "gpu"), kind], value)
        yield gpu


def build_registry(settings: Settings) -> tuple[CollectorRegistry, Counter, Histogram]:
    """A registry per app (not the process-global one), so several apps in one process never clash."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(settings))
    requests = Counter(
        "cellfuse_http_requests",
        "HTTP requests by route template, method and status",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "cellfuse_http_request_duration_seconds",
        "HTTP request latency by route template",
        ["method", "route"],
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    return registry, requests, latency


class HttpMetrics:
    """Pure ASGI middleware: counts requests and times them, labelled by route template (not raw path)."""

    def __init__(self, app, requests: Counter, latency: Histogram):
        self.app = app
        self.requests = requests
        self.latency = latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            self.requests.labels(method, template, str(status["code"])).inc()
            self.latency.labels(method, template).observe(time.perf_counter() - started)
