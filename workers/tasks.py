"""Thin named Celery tasks: each takes a job id and hands it to a pipeline.

Pipelines import torch and cellpose; they are imported inside the task so that sending a task (the
API) never loads them.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutdown

from workers.celery_app import celery_app
from workers.runner import run_job

log = logging.getLogger(__name__)

_TASK_OPTIONS = {"acks_late": True, "reject_on_worker_lost": True, "ignore_result": True}


@celery_app.task(name="cellfuse.jobs.noop", **_TASK_OPTIONS)
def noop_task(job_id: str) -> str:
    from workers import pipelines

    return run_job(job_id, pipelines.run_noop)


@celery_app.task(name="cellfuse.jobs.finetune", **_TASK_OPTIONS)
def finetune_task(job_id: str) -> str:
    from workers import pipelines

    return run_job(job_id, pipelines.run_finetune)


@celery_app.task(name="cellfuse.jobs.segment", **_TASK_OPTIONS)
def segment_task(job_id: str) -> str:
    from workers import pipelines

    return run_job(job_id, pipelines.run_segment)


@celery_app.task(name="cellfuse.jobs.evaluate", **_TASK_OPTIONS)
def evaluate_task(job_id: str) -> str:
    from workers import pipelines

    return run_job(job_id, pipelines.run_evaluate)


@celery_app.task(name="cellfuse.jobs.select_channels", **_TASK_OPTIONS)
def select_channels_task(job_id: str) -> str:
    from workers import pipelines

    return run_job(job_id, pipelines.run_select_channels)


# Workers also run the reaper, so that a deployment without the API process (or with the API down)
# still notices jobs whose worker died.
_reaper_stop = threading.Event()


@worker_ready.connect
def _start_background_threads(sender=None, **_kwargs) -> None:
    from app.reaper import reaper_loop
    from app.settings import get_settings
    from app.worker_presence import presence_loop

    settings = get_settings()
    queues = sorted(q.name for q in sender.app.amqp.queues.consume_from.values()) if sender else []
    threading.Thread(target=reaper_loop, args=(_reaper_stop,), daemon=True, name="job-reaper").start()
    threading.Thread(target=presence_loop, args=(_reaper_stop, settings, queues), daemon=True,
                     name="worker-presence").start()


@worker_shutdown.connect
def _stop_reaper(**_kwargs) -> None:
    _reaper_stop.set()
