"""The Celery application: JSON only, late acks, one message at a time per worker process.

Messages carry a job id and nothing else; the job's state lives in the database. This module must
stay light: the API imports it to send tasks by name and must not pull in torch or cellpose.
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
}


def make_celery(settings: Settings) -> Celery:
    app = Celery("cellfuse", broker=settings.resolved_broker_url, include=["workers.tasks"])
    transport_options: dict = {}
    if settings.resolved_broker_url.startswith("sqla+sqlite"):
        # The API and the worker share the broker file: wait for its lock instead of failing.
        transport_options["connect_args"] = {"timeout": 30}
    if settings.resolved_broker_url.startswith("redis"):
        # A message whose worker vanished returns after this long; the job reaper usually acts sooner.
        transport_options["visibility_timeout"] = 3600
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


celery_app = make_celery(get_settings())

_apps_by_broker: dict[str, Celery] = {}


def celery_for(settings: Settings) -> Celery:
    """The Celery app publishing to ``settings``' broker (one per broker URL, reused)."""
    url = settings.resolved_broker_url
    if url == celery_app.conf.broker_url:
        return celery_app
    if url not in _apps_by_broker:
        _apps_by_broker[url] = make_celery(settings)
    return _apps_by_broker[url]


def send_job(job_id: str, kind: str, settings: Settings | None = None) -> None:
    """Publish a job by task name (no import of the task code). Raises on a broker failure."""
    task_name, queue = TASK_ROUTES[kind]
    app = celery_for(settings) if settings is not None else celery_app
    app.send_task(task_name, args=[job_id], queue=queue,
                                  retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2,
                                                            "interval_step": 0.5})
