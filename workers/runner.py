"""Running one job inside a worker: claim, heartbeat, progress, cancellation, finish.

A pipeline receives a :class:`JobContext` and calls ``ctx.progress(stage, fraction)`` at its
checkpoints; that is where a cancellation takes effect. Whatever the pipeline raises becomes the
job's error message; the worker itself never crashes on a job's failure.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from billiard.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app import jobs
from app.db import session_factory
from app.models import Job
from app.settings import Settings, get_settings
from app.storage import BlobStore, JobFolder, StorageError, disk_full_error

log = logging.getLogger(__name__)

P = TypeVar("P", bound=BaseModel)


#: How long the end of an attempt waits for a heartbeat write in flight (a database outage can hold one).
HEARTBEAT_JOIN_S = 10.0


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
        #: Where a long job keeps what lets a later attempt resume (not a result; removed when the job ends).
        self.checkpoint_dir = checkpoint_dir(settings, job.id)
        self._last_report = 0.0
        #: When the pipeline last reached a checkpoint; the heartbeat stops once this is too old.
        self.last_checkpoint = time.monotonic()

    def params_as(self, model: type[P]) -> P:
        """The job's stored parameters as their typed model (``app.job_params``)."""
        try:
            return model.model_validate(self.params)
        except ValidationError as exc:
            raise JobFailed(
                f"this job's stored parameters are not a valid {model.__name__}: "
                f"{exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}"
            ) from None

    def progress(
        self,
        stage: str | None = None,
        fraction: float | None = None,
        *,
        summary: dict[str, Any] | None = None,
        force: bool = False,
    ) -> None:
        """Record progress (at most a few times a second) and stop here if cancelled."""
        now = time.monotonic()
        self.last_checkpoint = now
        if not force and stage is None and now - self._last_report < 0.5:
            return
        self._last_report = now
        cancelled = self._with_db_retry(
            lambda: jobs.report_progress(
                self.session, self.job_id, self.worker, stage=stage, progress=fraction, summary=summary
            )
        )
        if cancelled:
            raise jobs.JobCancelled(self.job_id)

    def _with_db_retry(self, call: Callable[[], Any], *, through_full_disk: bool = False) -> Any:
        """Ride out a database restart at a checkpoint instead of failing hours of work.

        Retries for as long as the heartbeat may lapse; after that the reaper has re-queued the
        job, and the next write raises JobLost. A database on a full disk (SQLite) is a storage
        failure, raised at once as :class:`StorageError` unless ``through_full_disk`` (recording
        the failure itself: that waits for space like any outage).
        """
        deadline = time.monotonic() + max(10.0, self.settings.job_stale_after_s)
        delay = 0.2
        while True:
            try:
                return call()
            except OperationalError as exc:
                self.session.rollback()
                full = disk_full_error(exc)
                if full is not None and not through_full_disk:
                    raise full from exc
                if time.monotonic() > deadline:
                    raise
                log.warning("database unreachable at a checkpoint of job %s; retrying", self.job_id)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def cancel_requested(self) -> bool:
        def read() -> bool:
            # A column read, not expire_all(): expiring would make every ORM object the pipeline
            # holds reload on its next attribute access, outside this retry.
            return bool(self.session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id)))

        return self._with_db_retry(read)

    def db(self, call: Callable[[], Any], *, through_full_disk: bool = False) -> Any:
        """Run a database step of a pipeline (reads and writes, then commit) riding out a restart.

        ``call`` must be repeatable: after a failure the session is rolled back and ``call`` runs again.
        """
        return self._with_db_retry(call, through_full_disk=through_full_disk)

    @contextmanager
    def stage(self, name: str, fraction: float | None = None) -> Iterator[None]:
        self.progress(name, fraction)
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - started
            self._with_db_retry(lambda: jobs.record_stage_timing(self.session, self.job_id, name, elapsed))

    def add_result(
        self, name: str, data: bytes, *, kind: str, media_type: str, meta: dict[str, Any] | None = None
    ) -> None:
        """Store one result file. A name is written once per attempt (a re-run starts with no
        results), so a second write under the same name is a bug that would lose data: it raises."""
        from app.models import JobResult

        def record() -> None:
            existing = self.session.query(JobResult).filter_by(job_id=self.job_id, name=name).one_or_none()
            if existing is not None:
                raise RuntimeError(f"result {name!r} was already written by this job; refusing to replace it")
            self.session.add(
                JobResult(
                    job_id=self.job_id,
                    name=name,
                    kind=kind,
                    media_type=media_type,
                    sha256=sha,
                    size_bytes=len(data),
                    meta=meta or {},
                )
            )
            self.session.commit()

        existing = self._with_db_retry(
            lambda: self.session.query(JobResult).filter_by(job_id=self.job_id, name=name).one_or_none()
        )
        if existing is not None:
            raise RuntimeError(f"result {name!r} was already written by this job; refusing to replace it")
        _path, sha = self.folder.write_bytes(name, data)
        self._with_db_retry(record)

    def drop_results_except(self, keep: Callable[[str], bool]) -> None:
        """Remove the result rows and files of an earlier attempt, except those ``keep(name)`` accepts."""
        from app.models import JobResult

        def drop() -> list[str]:
            rows = self.session.query(JobResult).filter_by(job_id=self.job_id).all()
            gone = [row.name for row in rows if not keep(row.name)]
            for row in rows:
                if row.name in gone:
                    self.session.delete(row)
            self.session.commit()
            return gone

        self._with_db_retry(drop)
        if self.folder.path.is_dir():
            for path in list(self.folder.path.rglob("*")):
                name = path.relative_to(self.folder.path).as_posix()
                if path.is_file() and not keep(name):
                    path.unlink(missing_ok=True)


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
                log.error(
                    "job %s made no progress for %.0f s; no more heartbeats (the reaper takes over)",
                    self.job_id,
                    stalled_s,
                )
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


def checkpoint_dir(settings: Settings, job_id: str) -> Path:
    return settings.resolved_data_dir / "checkpoints" / JobFolder(settings.jobs_dir, job_id).path.name


def _drop_checkpoints(settings: Settings, job_id: str) -> None:
    shutil.rmtree(checkpoint_dir(settings, job_id), ignore_errors=True)


def _drop_results(session: Session, job_id: str) -> None:
    from sqlalchemy import delete

    from app.models import JobResult

    session.execute(delete(JobResult).where(JobResult.job_id == job_id))
    session.commit()


def run_job(
    job_id: str,
    pipeline: Callable[[JobContext], dict[str, Any] | None],
    settings: Settings | None = None,
    worker: str | None = None,
) -> str:
    """Claim and run one job; returns the final status (or 'skipped' when not claimable).

    A job that ends (succeeded, failed, cancelled) loses its checkpoints; one that was interrupted
    or taken over keeps them for the attempt that resumes it.
    """
    settings = settings or get_settings()
    status = _run_job(job_id, pipeline, settings, worker or worker_name())
    if status in jobs.FINAL_STATUSES:
        _drop_checkpoints(settings, job_id)
    return status


def _run_job(
    job_id: str, pipeline: Callable[[JobContext], dict[str, Any] | None], settings: Settings, worker: str
) -> str:
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
            # A re-run starts clean: no file and no result row of an earlier (killed) attempt; a
            # resumable pipeline keeps what it finished and tidies the rest itself.
            if not getattr(pipeline, "resumable", False):
                ctx.folder.clear()
                ctx.db(lambda: _drop_results(session, job_id))
            summary = pipeline(ctx) or {}
        except jobs.JobLost:
            session.rollback()
            log.warning("job %s was taken over by another attempt; this one stops", job_id)
            return "lost"
        except jobs.JobCancelled:
            session.rollback()

            def cancel() -> None:
                kept = _result_count(session, job_id)
                # A column read, not session.get(): sessions keep objects across commits
                # (expire_on_commit=False) and progress() writes the summary with an UPDATE, so the
                # identity map may hold the summary of the claim (a fine-tune lost its curve here).
                current = dict(session.scalar(select(Job.summary).where(Job.id == job_id)) or {})
                jobs.finish(
                    session,
                    job_id,
                    jobs.JobStatus.CANCELLED,
                    worker=worker,
                    error="cancelled by request"
                    + (f"; the {kept} result file(s) written before it are kept and are partial" if kept else ""),
                    summary={**current, "partial_results": bool(kept), "files_kept": kept},
                )

            ctx.db(cancel)
            return jobs.JobStatus.CANCELLED.value
        except SoftTimeLimitExceeded:
            session.rollback()
            ctx.db(
                lambda: jobs.finish(
                    session,
                    job_id,
                    jobs.JobStatus.FAILED,
                    worker=worker,
                    error="the job ran past its time limit for this kind of job and was stopped",
                )
            )
            return jobs.JobStatus.FAILED.value
        except (JobFailed, StorageError, OperationalError) as exc:
            session.rollback()
            if isinstance(exc, OperationalError):
                full = disk_full_error(exc)
                if full is None:
                    # The database stayed away longer than the retries: leave the job to the reaper,
                    # which re-queues it once the heartbeat is stale.
                    log.warning("job %s stopped: the database is unreachable", job_id, exc_info=True)
                    return "interrupted"
                exc = full  # SQLite on a full disk
            message = exc.strerror if isinstance(exc, StorageError) and exc.strerror else str(exc)
            try:
                # Recording the failure waits for the database (and for space) like any checkpoint.
                ctx.db(
                    lambda: jobs.finish(session, job_id, jobs.JobStatus.FAILED, error=message, worker=worker),
                    through_full_disk=True,
                )
            except OperationalError:
                log.error("job %s failed (%s) and the failure cannot be recorded yet", job_id, message)
                return "interrupted"
            return jobs.JobStatus.FAILED.value
        except Exception as exc:
            session.rollback()
            log.exception("job %s failed", job_id)
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            ctx.db(
                lambda: jobs.finish(
                    session, job_id, jobs.JobStatus.FAILED, error=f"internal error: {message}", worker=worker
                )
            )
            return jobs.JobStatus.FAILED.value
        finally:
            beat.stop_event.set()
            # A beat already in flight lands before run_job returns or raises, never after: a beat
            # from an ended attempt moves heartbeat_at under the reaper, whose re-queue of a dead
            # attempt (compare-and-set on heartbeat_at) then finds nothing to do.
            beat.join(timeout=HEARTBEAT_JOIN_S)
            if beat.is_alive():
                log.warning("the heartbeat of job %s is still writing after the attempt ended", job_id)
        if ctx._with_db_retry(ctx.cancel_requested):
            # Cancelled after the last checkpoint: honour it, and say what was kept.
            kept = _result_count(session, job_id)
            jobs.finish(
                session,
                job_id,
                jobs.JobStatus.CANCELLED,
                worker=worker,
                error="cancelled by request; results written before the cancellation are kept and are partial",
                summary={**summary, "partial_results": True, "files_kept": kept},
            )
            return jobs.JobStatus.CANCELLED.value
        if ctx._with_db_retry(
            lambda: jobs.finish(session, job_id, jobs.JobStatus.SUCCEEDED, summary=summary, worker=worker)
        ):
            return jobs.JobStatus.SUCCEEDED.value
        return "lost"
