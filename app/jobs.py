"""The job state machine: the only code that writes a job's status.

    queued ──claim──▶ running ──▶ succeeded | failed | cancelled
      │                 │
      └──cancel──▶ cancelled   └──worker lost──▶ queued (attempts left) | failed (none left)

Every transition is a conditional UPDATE (``WHERE status = …``), so two workers that receive the
same message (a redelivery, a resend after a broker restart) cannot both claim the job, and a
late writer cannot overwrite a final state.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.models import Job, ModelVersion, utcnow

__all__ = ["Job", "JobStatus", "JobCancelled", "JobLost", "JobNotClaimable", "FINAL_STATUSES"]

log = logging.getLogger(__name__)


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value})


class JobCancelled(Exception):
    """Raised at a checkpoint of a job whose cancellation was requested."""


class JobNotClaimable(Exception):
    pass


class JobLost(JobCancelled):
    """This worker no longer owns the job (the reaper gave it to another worker): stop writing.

    A kind of cancellation, so that pipelines that let cancellations through also let this through.
    """


def create_job(
    session: Session,
    kind: str,
    params: dict[str, Any],
    *,
    owner_key_id: int | None = None,
    idempotency_key: str | None = None,
    max_attempts: int = 3,
) -> tuple[Job, bool]:
    """Insert a queued job; with an idempotency key, return the existing job instead. -> (job, created)"""
    if idempotency_key is not None:
        existing = session.scalar(
            select(Job).where(Job.owner_key_id == owner_key_id, Job.idempotency_key == idempotency_key)
        )
        if existing is not None:
            return existing, False
    job = Job(
        kind=kind,
        params=params,
        owner_key_id=owner_key_id,
        idempotency_key=idempotency_key,
        max_attempts=max_attempts,
        status=JobStatus.QUEUED.value,
        stage="queued",
    )
    session.add(job)
    session.flush()
    return job, True


def mark_enqueued(session: Session, job_id: str) -> None:
    session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))


def claim(session: Session, job_id: str, worker: str) -> Job:
    """queued → running, once. Raises JobNotClaimable if another worker has it or it is final."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED.value, Job.cancel_requested.is_(False))
        .values(
            status=JobStatus.RUNNING.value,
            worker=worker,
            started_at=now,
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            stage="starting",
            error=None,
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if result.rowcount != 1:
        job = session.get(Job, job_id)
        if job is not None and job.status == JobStatus.QUEUED.value and job.cancel_requested:
            finish(
                session,
                job_id,
                JobStatus.CANCELLED,
                error="cancelled before it started",
                from_statuses=(JobStatus.QUEUED.value,),
            )
        raise JobNotClaimable(job_id)
    job = session.get_one(Job, job_id)
    session.refresh(job)
    return job


def heartbeat(session: Session, job_id: str, worker: str) -> bool:
    """Refresh the heartbeat; False when this worker no longer owns the job."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker == worker)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def report_progress(
    session: Session,
    job_id: str,
    worker: str,
    *,
    stage: str | None = None,
    progress: float | None = None,
    summary: dict[str, Any] | None = None,
) -> bool:
    """Record progress; returns True when cancellation has been requested.

    Raises :class:`JobLost` when the job is no longer running under ``worker`` (re-queued after a
    stale heartbeat, or finished): the caller must stop, because another attempt owns the job now.
    """
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if stage is not None:
        values["stage"] = stage[:200]
    if progress is not None:
        values["progress"] = max(0.0, min(1.0, float(progress)))
    if summary is not None:
        values["summary"] = summary
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.worker == worker)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    if result.rowcount != 1:
        raise JobLost(job_id)
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def record_stage_timing(session: Session, job_id: str, stage: str, seconds: float) -> None:
    job = session.get(Job, job_id)
    if job is None:
        return
    timings = dict(job.stage_timings or {})
    timings[stage] = round(timings.get(stage, 0.0) + seconds, 4)
    job.stage_timings = timings
    session.commit()


def finish(
    session: Session,
    job_id: str,
    status: JobStatus,
    *,
    error: str | None = None,
    summary: dict[str, Any] | None = None,
    worker: str | None = None,
    from_statuses: tuple[str, ...] = (JobStatus.RUNNING.value,),
) -> bool:
    """Move to a final state; only from ``from_statuses`` (and only by the owner when given)."""
    values: dict[str, Any] = {"status": status.value, "finished_at": utcnow(), "error": error}
    if status == JobStatus.SUCCEEDED:
        values.update(progress=1.0, stage="done")
    else:
        values["stage"] = status.value
    if summary is not None:
        values["summary"] = summary
    stmt = update(Job).where(Job.id == job_id, Job.status.in_(from_statuses))
    if worker is not None:
        stmt = stmt.where(Job.worker == worker)
    result = session.execute(stmt.values(**values).execution_options(synchronize_session=False))
    session.commit()
    if result.rowcount != 1:
        return False
    if status != JobStatus.SUCCEEDED:
        # Here and not in each pipeline: a cancel seen at a progress checkpoint inside training
        # raises JobCancelled past the pipeline's own clean-up and left its version 'training'.
        _fail_unfinished_outputs(session, job_id)
    # The one place every final state passes through, once: the LIMS hears of it here.
    _emit_job_event(session, job_id)
    return True


def _emit_job_event(session: Session, job_id: str) -> None:
    from app.webhooks import emit_safely, job_event_data

    job = session.get(Job, job_id)
    if job is None:
        return
    session.refresh(job)
    emit_safely(
        session,
        f"job.{job.status}",
        job_event_data(job),
        owner_key_id=job.owner_key_id,
        job_id=job.id,
        plate=(job.params or {}).get("plate"),
    )


def request_cancel(session: Session, job_id: str) -> Job | None:
    """A queued job is cancelled at once; a running one stops at its next checkpoint."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    if job.status in FINAL_STATUSES:
        return job
    session.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
    session.commit()
    finish(
        session,
        job_id,
        JobStatus.CANCELLED,
        error="cancelled before it started",
        from_statuses=(JobStatus.QUEUED.value,),
    )
    session.refresh(job)
    return job


def _fail_unfinished_outputs(session: Session, job_id: str) -> None:
    """A model version whose training job died for good is failed, not left 'training' forever."""
    session.execute(
        update(ModelVersion)
        .where(ModelVersion.job_id == job_id, ModelVersion.status == "training")
        .values(status="failed")
        .execution_options(synchronize_session=False)
    )
    session.commit()


@dataclass(frozen=True)
class ReaperAction:
    job_id: str
    action: str  # requeued | failed | resend
    reason: str


def reap_stale_jobs(
    session: Session, *, stale_after_s: float, resend_after_s: float, now: datetime | None = None
) -> list[ReaperAction]:
    """Find jobs whose worker died (stale heartbeat) and queued jobs whose message may be lost.

    Running jobs with attempts left go back to ``queued`` (the caller re-sends them); without,
    they fail with a reason a person can act on. Queued jobs sent long ago are returned for resend.
    """
    now = now or datetime.now(timezone.utc)
    actions: list[ReaperAction] = []
    stale_before = now - timedelta(seconds=stale_after_s)
    for job in session.scalars(
        select(Job).where(Job.status == JobStatus.RUNNING.value, Job.heartbeat_at < stale_before)
    ).all():
        reason = (
            f"the worker {job.worker or '?'} stopped answering during '{job.stage}' "
            f"(attempt {job.attempts} of {job.max_attempts})"
        )
        if job.cancel_requested:
            if finish(session, job.id, JobStatus.CANCELLED, error="cancelled (its worker was lost)"):
                actions.append(ReaperAction(job.id, "cancelled", reason))
        elif job.attempts < job.max_attempts:
            result = session.execute(
                update(Job)
                .where(Job.id == job.id, Job.status == JobStatus.RUNNING.value, Job.heartbeat_at == job.heartbeat_at)
                .values(
                    status=JobStatus.QUEUED.value,
                    stage=f"re-queued: {reason}"[:200],
                    worker=None,
                    progress=0.0,
                    enqueued_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            session.commit()
            if result.rowcount == 1:
                actions.append(ReaperAction(job.id, "requeued", reason))
        elif finish(session, job.id, JobStatus.FAILED, error=f"gave up after {job.attempts} attempts: {reason}"):
            actions.append(ReaperAction(job.id, "failed", reason))
    resend_before = now - timedelta(seconds=resend_after_s)
    for job in session.scalars(
        select(Job).where(
            Job.status == JobStatus.QUEUED.value,
            or_(Job.enqueued_at.is_(None), Job.enqueued_at < resend_before),
            Job.created_at < resend_before,
        )
    ).all():
        actions.append(ReaperAction(job.id, "resend", "still queued; its message may have been lost"))
    return actions
