"""The producer side of Celery: the app configuration, task names, routes, and sending by name.

The API and the reaper publish jobs through here without importing any task code; the worker
process (``workers.celery_app``) uses the same configuration and registers the tasks. This module
must stay light: it never imports torch, cellpose or ``workers``.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from app.settings import Settings, get_settings

#: Job kind -> (task name, queue). Neural-network work goes to ``gpu`` workers.
TASK_ROUTES: dict[str, tuple[str, str]] = {
    "noop": ("cellfuse.jobs.noop", "cpu"),
    "finetune": ("cellfuse.jobs.finetune", "gpu"),
    "segment": ("cellfuse.jobs.segment", "gpu"),
    "evaluate": ("cellfuse.jobs.evaluate", "gpu"),
    "select_channels": ("cellfuse.jobs.select_channels", "gpu"),
    "pretrain_isl": ("cellfuse.jobs.pretrain_isl", "gpu"),
    "self_train": ("cellfuse.jobs.self_train", "gpu"),
}

#: Redis re-delivers an unacknowledged message after this long. It must exceed the longest hard
#: time limit of any task (see ``TASK_TIME_LIMITS``), or a long fine-tune would run twice.
REDIS_VISIBILITY_TIMEOUT_S = 8 * 3600

#: How often a worker on a polling broker (the embedded SQLite one) looks for a message when idle.
EMBEDDED_POLLING_INTERVAL_S = 0.05

#: Per job kind: (soft, hard) time limits in seconds. The soft limit raises inside the task (the
#: job fails with a clear reason); the hard limit kills a task that ignores it. Both stay below
#: ``REDIS_VISIBILITY_TIMEOUT_S``.
TASK_TIME_LIMITS: dict[str, tuple[int, int]] = {
    "noop": (2 * 3600, 2 * 3600 + 60),
    "finetune": (6 * 3600, 6 * 3600 + 300),
    "segment": (6 * 3600, 6 * 3600 + 300),
    "evaluate": (2 * 3600, 2 * 3600 + 120),
    "select_channels": (4 * 3600, 4 * 3600 + 120),
    "pretrain_isl": (6 * 3600, 6 * 3600 + 300),
    "self_train": (6 * 3600, 6 * 3600 + 300),
}


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ``settings``' broker: JSON only, late acks, one message at a time."""
    app = Celery("cellfuse", broker=settings.resolved_broker_url, include=["workers.tasks"])
    transport_options: dict = {}
    if settings.resolved_broker_url.startswith("sqla+sqlite"):
        # The API and the worker share the broker file: wait for its lock instead of failing.
        transport_options["connect_args"] = {"timeout": 30}
    if settings.resolved_broker_url.startswith("sqla+"):
        # A polling transport: kombu sleeps this long whenever it finds nothing it may take, and
        # with one message in flight per process that is after every job: the 1 s default capped
        # the embedded default at about one job per second. (Set on the class: this transport hands
        # its transport options to create_engine, which refuses unknown keys.)
        from kombu.transport import sqlalchemy as kombu_sqla

        kombu_sqla.Transport.polling_interval = EMBEDDED_POLLING_INTERVAL_S
    if settings.resolved_broker_url.startswith("redis"):
        transport_options["visibility_timeout"] = REDIS_VISIBILITY_TIMEOUT_S
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_queues=[Queue("gpu"), Queue("cpu")],
        task_default_queue="cpu",
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        # The API never blocks for long on a broken broker: publishing fails fast (503) instead.
        broker_connection_timeout=3,
    )
    return app


_apps_by_broker: dict[str, Celery] = {}


def celery_for(settings: Settings | None = None) -> Celery:
    """The Celery app publishing to ``settings``' broker (one per broker URL, reused)."""
    settings = settings or get_settings()
    url = settings.resolved_broker_url
    if url not in _apps_by_broker:
        _apps_by_broker[url] = make_celery(settings)
    return _apps_by_broker[url]


def send_job(job_id: str, kind: str, settings: Settings | None = None) -> None:
    """Publish a job by task name (no import of the task code). Raises on a broker failure."""
    task_name, queue = TASK_ROUTES[kind]
    celery_for(settings).send_task(
        task_name,
        args=[job_id],
        queue=queue,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
    )
