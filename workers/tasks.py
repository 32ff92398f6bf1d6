"""Thin named Celery tasks: each takes a job id and hands it to its job kind's pipeline.

Task names, queues and time limits come from ``app.queue`` (shared with the producer side).
Pipelines import torch and cellpose; they are imported inside the task so that loading this module
stays cheap.
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_process_init, worker_ready, worker_shutdown

from app.queue import TASK_ROUTES, TASK_TIME_LIMITS
from workers.celery_app import celery_app
from workers.runner import run_job

log = logging.getLogger(__name__)


def _task_options(kind: str) -> dict:
    soft, hard = TASK_TIME_LIMITS[kind]
    return {
        "name": TASK_ROUTES[kind][0],
        "acks_late": True,
        "reject_on_worker_lost": True,
        "ignore_result": True,
        "soft_time_limit": soft,
        "time_limit": hard,
    }


def _run(kind: str, job_id: str) -> str:
    from workers.pipelines import pipeline_for

    return run_job(job_id, pipeline_for(kind))


@celery_app.task(**_task_options("noop"))
def noop_task(job_id: str) -> str:
    return _run("noop", job_id)


@celery_app.task(**_task_options("finetune"))
def finetune_task(job_id: str) -> str:
    return _run("finetune", job_id)


@celery_app.task(**_task_options("segment"))
def segment_task(job_id: str) -> str:
    return _run("segment", job_id)


@celery_app.task(**_task_options("evaluate"))
def evaluate_task(job_id: str) -> str:
    return _run("evaluate", job_id)


@celery_app.task(**_task_options("select_channels"))
def select_channels_task(job_id: str) -> str:
    return _run("select_channels", job_id)


@celery_app.task(**_task_options("pretrain_isl"))
def pretrain_isl_task(job_id: str) -> str:
    return _run("pretrain_isl", job_id)


@celery_app.task(**_task_options("self_train"))
def self_train_task(job_id: str) -> str:
    return _run("self_train", job_id)


@worker_process_init.connect
def _resolve_compute_in_pool_process(**_kwargs) -> None:
    """Each pool process picks its device after the fork; the prefork parent never touches CUDA.

    On a thread: importing torch can take longer than Celery's wait for a new pool process
    (``worker_proc_alive_timeout``); a job that arrives first waits for it (``worker_compute``).
    """

    def resolve() -> None:
        from workers.compute import worker_compute

        try:
            worker_compute()
        except Exception:  # the jobs of this process fail with the reason; the worker keeps running
            log.exception("this worker process cannot use its configured device")

    threading.Thread(target=resolve, name="resolve-device", daemon=True).start()


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
    threading.Thread(
        target=presence_loop, args=(_reaper_stop, settings, queues), daemon=True, name="worker-presence"
    ).start()


@worker_shutdown.connect
def _stop_reaper(**_kwargs) -> None:
    _reaper_stop.set()
