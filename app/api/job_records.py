"""Creating and presenting jobs: the API side of the job state machine."""

from __future__ import annotations

import logging
from typing import Any, cast

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import jobs
from app.api.errors import Problem
from app.api.schemas import JobOut, JobStatusLiteral, ResultOut
from app.models import Job
from app.security import Principal
from app.settings import Settings

log = logging.getLogger(__name__)

IDEMPOTENCY_KEY_MAX = 200


def submit_job(
    session: Session,
    settings: Settings,
    kind: str,
    params: dict[str, Any],
    principal: Principal,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """Create the row, commit, then publish by task name. -> (job, created)

    If the broker is unreachable the job stays queued in the database and the reaper sends it
    when the broker is back: an accepted job is never lost.
    """
    from app.queue import send_job

    if idempotency_key is not None and not (0 < len(idempotency_key) <= IDEMPOTENCY_KEY_MAX):
        raise Problem(400, f"Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_MAX} characters", slug="bad-idempotency-key")
    try:
        job, created = jobs.create_job(
            session,
            kind,
            params,
            owner_key_id=principal.key_id,
            idempotency_key=idempotency_key,
            max_attempts=settings.job_max_attempts,
        )
        session.commit()
    except IntegrityError:  # the same key raced in from a parallel retry
        session.rollback()
        job, created = jobs.create_job(
            session, kind, params, owner_key_id=principal.key_id, idempotency_key=idempotency_key
        )
    if not created:
        if job.kind != kind or job.params != params:
            raise Problem(
                409,
                "this Idempotency-Key was already used for a different request",
                slug="idempotency-key-reused",
                job_id=job.id,
            )
        return job, False
    try:
        send_job(job.id, kind, settings)
        jobs.mark_enqueued(session, job.id)
        session.commit()
    except Exception:
        log.warning("broker unreachable; job %s stays queued and will be sent later", job.id, exc_info=True)
        session.rollback()
    session.refresh(job)
    return job, True


def job_out(job: Job, base_url: str = "/api/v1") -> JobOut:
    results = [
        ResultOut(
            name=r.name,
            kind=r.kind,
            media_type=r.media_type,
            size_bytes=r.size_bytes,
            sha256=r.sha256,
            meta=r.meta or {},
            url=f"{base_url}/jobs/{job.id}/results/{r.name}",
        )
        for r in job.results
    ]
    return JobOut(
        id=job.id,
        kind=job.kind,
        status=cast(JobStatusLiteral, job.status),
        stage=job.stage,
        progress=job.progress,
        error=job.error,
        params=job.params or {},
        summary=job.summary or {},
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        worker=job.worker,
        cancel_requested=job.cancel_requested,
        stage_timings=job.stage_timings or {},
        created_at=job.created_at,
        started_at=job.started_at,
        heartbeat_at=job.heartbeat_at,
        finished_at=job.finished_at,
        results=results,
        partial_results=bool(results) and job.status in ("cancelled", "failed"),
    )


def get_visible_job(session: Session, job_id: str, principal: Principal) -> Job:
    """Instruments see their own jobs; scientists and admins see all."""
    job = session.get(Job, job_id)
    if job is None or (not principal.has_role("scientist") and job.owner_key_id != principal.key_id):
        raise Problem(404, f"no job with id {job_id}", slug="job-not-found")
    return job
