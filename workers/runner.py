"""Running one job inside a worker: claim, heartbeat, progress, cancellation, finish.

A pipeline receives a :class:`JobContext` and calls ``ctx.progress(stage, fraction)`` at its
checkpoints; that is where a cancellation takes effect. Whatever the pipeline raises becomes the
job's error message; the worker itself never crashes on a job's failure.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from billiard.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app import jobs
from app.db import session_factory
from app.models import Job
from app.settings import Settings, get_settings
from app.storage import BlobStore, JobFolder, StorageError

log = logging.getLogger(__name__)

P = TypeVar("P", bound=BaseModel)

def worker_name() -> str:
    # Evaluated per call: a prefork child has its own pid, not its parent's.
    return f"{socket.gethostname()}:{os.getpid()}"


class JobFailed(Exception):
    """A failure whose message is meant for the person who submitted the job."""


class JobContext:
    def __init__(self, session: Session, job: Job, settings: Settings, worker: str):
        self.session = session
        self.job = job
        self.job_id = job.id
        self.params: dict[str, Any] = dict(job.params or {})
        self.settings = settings
        self.worker = worker
        self.blobs = BlobStore(settings.blob_dir)
        self.folder = JobFolder(settings.jobs_dir, job.id)
        self._last_report = 0.0
        #: When the pipeline last reached a checkpoint; the heartbeat stops once this is too old.
        self.last_checkpoint = time.monotonic()

    def params_as(self, model: type[P]) -> P:
        """The job's stored parameters as their typed model (``app.job_params``)."""
        try:
            return model.model_validate(self.params)
        except ValidationError as exc:
            raise JobFailed(f"this job's stored parameters are not a valid {model.__name__}: "
                            f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}") from None

    def progress(self, stage: str | None = None, fraction: float | None = None, *,
                 summary: dict[str, Any] | None = None, force: bool = False) -> None:
        """Record progress (at most a few times a second) and stop here if cancelled."""
        now = time.monotonic()
        self.last_checkpoint = now
        if not force and stage is None and now - self._last_report < 0.5:
            return
        self._last_report = now
        cancelled = self._with_db_retry(lambda: jobs.report_progress(
            self.session, self.job_id, self.worker, stage=stage, progress=fraction, summary=summary))
        if cancelled:
            raise jobs.JobCancelled(self.job_id)

    def _with_db_retry(self, call: Callable[[], Any]) -> Any:
        """Ride out a database restart at a checkpoint instead of failing hours of work.

        Retries for as long as the heartbeat may lapse; after that the reaper has re-queued the
        job, and the next write raises JobLost.
        """
        deadline = time.monotonic() + max(10.0, self.settings.job_stale_after_s)
        delay = 0.2
        while True:
            try:
                return call()
            except OperationalError:
                self.session.rollback()
                if time.monotonic() > deadline:
                    raise
                log.warning("database unreachable at a checkpoint of job %s; retrying", self.job_id)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def cancel_requested(self) -> bool:
        self.session.expire_all()
        job = self.session.get(Job, self.job_id)
        return bool(job and job.cancel_requested)

    @contextmanager
    def stage(self, name: str, fraction: float | None = None) -> Iterator[None]:
        self.progress(name, fraction)
        started = time.perf_counter()
        try:
            yield
        finally:
            jobs.record_stage_timing(self.session, self.job_id, name, time.perf_counter() - started)

    def add_result(self, name: str, data: bytes, *, kind: str, media_type: str,
                   meta: dict[str, Any] | None = None) -> None:
        """Store one result file. A name is written once per attempt (a re-run starts with no
        results), so a second write under the same name is a bug that would lose data: it raises."""
        from app.models import JobResult

        existing = self.session.query(JobResult).filter_by(job_id=self.job_id, name=name).one_or_none()
        if existing is not None:
            raise RuntimeError(f"result {name!r} was already written by this job; refusing to replace it")
        _path, sha = self.folder.write_bytes(name, data)
        self.session.add(JobResult(job_id=self.job_id, name=name, kind=kind, media_type=media_type,
                                   sha256=sha, size_bytes=len(data), meta=meta or {}))
        self.session.commit()


class _Heartbeat(threading.Thread):
    """Beats while the job's pipeline keeps reaching checkpoints.

    A job whose thread is alive but whose work has stopped (a hung library call, a deadlock) stops
    reaching checkpoints; after ``job_stall_after_s`` the heartbeat stops too, so the reaper treats
    the job as stalled: it is re-queued (or failed when no attempt is left), and this attempt's
    next write raises JobLost.
    """

    def __init__(self, settings: Settings, job_id: str, worker: str, ctx: JobContext):
        super().__init__(daemon=True, name=f"heartbeat-{job_id[:8]}")
        self.settings, self.job_id, self.worker, self.ctx = settings, job_id, worker, ctx
        self.stop_event = threading.Event()

    def run(self) -> None:
        factory = session_factory(self.settings.resolved_database_url)
        while not self.stop_event.wait(self.settings.job_heartbeat_s):
            stalled_s = time.monotonic() - self.ctx.last_checkpoint
            if stalled_s > self.settings.job_stall_after_s:
                log.error("job %s made no progress for %.0f s; no more heartbeats (the reaper takes over)",
                          self.job_id, stalled_s)
                return
            try:
                with factory() as session:
                    if not jobs.heartbeat(session, self.job_id, self.worker):
                        return
            except Exception:  # a database blip must not kill the job; the next beat retries
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)


def _result_count(session: Session, job_id: str) -> int:
    from sqlalchemy import func, select

    from app.models import JobResult

    return int(session.scalar(select(func.count()).select_from(JobResult).where(JobResult.job_id == job_id)) or 0)


def _drop_results(session: Session, job_id: str) -> None:
    from sqlalchemy import delete

    from app.models import JobResult

    session.execute(delete(JobResult).where(JobResult.job_id == job_id))
    session.commit()


def run_job(job_id: str, pipeline: Callable[[JobContext], dict[str, Any] | None],
            settings: Settings | None = None, worker: str | None = None) -> str:
    """Claim and run one job; returns the final status (or 'skipped' when not claimable)."""
    settings = settings or get_settings()
    worker = worker or worker_name()
    factory = session_factory(settings.resolved_database_url)
    with factory() as session:
        try:
            job = jobs.claim(session, job_id, worker)
        except jobs.JobNotClaimable:
            log.info("job %s is not claimable (already taken, finished or cancelled)", job_id)
            return "skipped"
        ctx = JobContext(session, job, settings, worker)
        beat = _Heartbeat(settings, job_id, worker, ctx)
        beat.start()
        try:
            # A re-run starts clean: no file and no result row of an earlier (killed) attempt.
            ctx.folder.clear()
            _drop_results(session, job_id)
            summary = pipeline(ctx) or {}
        except jobs.JobLost:
            session.rollback()
            log.warning("job %s was taken over by another attempt; this one stops", job_id)
            return "lost"
        except jobs.JobCancelled:
            session.rollback()
            kept = _result_count(session, job_id)
            current = dict((session.get(Job, job_id).summary or {}))
            jobs.finish(session, job_id, jobs.JobStatus.CANCELLED, worker=worker,
                        error="cancelled by request" + (
                            f"; the {kept} result file(s) written before it are kept and are partial" if kept else ""),
                        summary={**current, "partial_results": bool(kept), "files_kept": kept})
            return jobs.JobStatus.CANCELLED.value
        except SoftTimeLimitExceeded:
            session.rollback()
            jobs.finish(session, job_id, jobs.JobStatus.FAILED, worker=worker,
                        error="the job ran past its time limit for this kind of job and was stopped")
            return jobs.JobStatus.FAILED.value
        except (JobFailed, StorageError) as exc:
            session.rollback()
            message = exc.strerror if isinstance(exc, StorageError) and exc.strerror else str(exc)
            jobs.finish(session, job_id, jobs.JobStatus.FAILED, error=message, worker=worker)
            return jobs.JobStatus.FAILED.value
        except Exception as exc:
            session.rollback()
            log.exception("job %s failed", job_id)
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            jobs.finish(session, job_id, jobs.JobStatus.FAILED, error=f"internal error: {message}",
                        worker=worker)
            return jobs.JobStatus.FAILED.value
        finally:
            beat.stop_event.set()
        if ctx._with_db_retry(ctx.cancel_requested):
            # Cancelled after the last checkpoint: honour it, and say what was kept.
            kept = _result_count(session, job_id)
            jobs.finish(session, job_id, jobs.JobStatus.CANCELLED, worker=worker,
                        error="cancelled by request; results written before the cancellation are kept "
                              "and are partial", summary={**summary, "partial_results": True,
                                                          "files_kept": kept})
            return jobs.JobStatus.CANCELLED.value
        if ctx._with_db_retry(lambda: jobs.finish(session, job_id, jobs.JobStatus.SUCCEEDED, summary=summary,
                                                   worker=worker)):
            return jobs.JobStatus.SUCCEEDED.value
        return "lost"
