"""Jobs: list, read, cancel, download results; and the trivial built-in ``noop`` job."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse
from sqlalchemy import func, select

from app import jobs
from app.api.deps import InstrumentDep, SessionDep, SettingsDep
from app.api.errors import Problem
from app.api.job_records import get_visible_job, job_out, submit_job
from app.api.schemas import JobOut, JobPage, JobStatusLiteral, NoopJobIn
from app.models import Job, JobResult
from app.storage import JobFolder, check_result_name

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


@router.get("", response_model=JobPage, summary="List jobs, newest first")
def list_jobs(
    session: SessionDep,
    principal: InstrumentDep,
    status: Annotated[JobStatusLiteral | None, Query()] = None,
    kind: Annotated[str | None, Query(max_length=30)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> JobPage:
    stmt = select(Job)
    if not principal.has_role("scientist"):
        stmt = stmt.where(Job.owner_key_id == principal.key_id)
    if status:
        stmt = stmt.where(Job.status == status)
    if kind:
        stmt = stmt.where(Job.kind == kind)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.scalars(stmt.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return JobPage(items=[job_out(j) for j in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, summary="One job with its progress and results")
def get_job(job_id: str, session: SessionDep, principal: InstrumentDep) -> JobOut:
    return job_out(get_visible_job(session, job_id, principal))


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    status_code=202,
    summary="Cancel: queued jobs at once, running jobs at their next checkpoint",
)
def cancel_job(job_id: str, session: SessionDep, principal: InstrumentDep) -> JobOut:
    get_visible_job(session, job_id, principal)
    job = jobs.request_cancel(session, job_id)
    assert job is not None  # get_visible_job answered 404 for a missing job
    session.refresh(job)
    return job_out(job)


@router.get(
    "/{job_id}/results/{name:path}",
    summary="Download one result file",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_result(
    job_id: str, name: str, session: SessionDep, settings: SettingsDep, principal: InstrumentDep
) -> Response:
    job = get_visible_job(session, job_id, principal)
    try:
        check_result_name(name)
    except ValueError:
        raise Problem(404, f"job {job_id} has no result named {name!r}", slug="result-not-found")
    result = session.scalar(select(JobResult).where(JobResult.job_id == job.id, JobResult.name == name))
    if result is None:
        raise Problem(404, f"job {job_id} has no result named {name!r}", slug="result-not-found")
    path = JobFolder(settings.jobs_dir, job.id).file(name)
    if not path.is_file():
        raise Problem(410, f"the file of result {name!r} is no longer on disk", slug="result-gone")
    filename = name.replace("/", "_")
    return FileResponse(
        path, media_type=result.media_type, filename=filename, headers={"X-Content-SHA256": result.sha256}
    )


@router.post(
    "/noop",
    response_model=JobOut,
    status_code=202,
    summary="Submit the trivial built-in job (checks a deployment end to end)",
)
def submit_noop(
    body: NoopJobIn,
    session: SessionDep,
    settings: SettingsDep,
    principal: InstrumentDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    limit = settings.max_noop_seconds.get(principal.role, 0.0)
    if body.steps * body.step_seconds > limit:
        raise Problem(
            422,
            f"this noop job would run {body.steps * body.step_seconds:g} s; a {principal.role} key "
            f"may queue at most {limit:g} s (steps × step_seconds)",
            slug="job-too-long",
            limit_seconds=limit,
        )
    job, created = submit_job(session, settings, "noop", body.model_dump(), principal, idempotency_key)
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    if not created:
        response.status_code = 200
    return job_out(job)
