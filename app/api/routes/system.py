"""Liveness and readiness."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from importlib import metadata
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse
from sqlalchemy import select, text

from app import __version__
from app.api.deps import SessionDep, SettingsDep
from app.api.schemas import HealthOut, ReadyOut, as_utc
from app.models import WorkerHeartbeat
from app.settings import Settings
from app.worker_presence import PRESENCE_INTERVAL_S

router = APIRouter(tags=["system"])

#: A worker counts as present only if its presence row was refreshed within two presence intervals
#: (plus a second of slack): a killed worker's row must not keep the service "ready".
WORKER_FRESH_S = 2 * PRESENCE_INTERVAL_S + 1.0


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@router.get("/health", response_model=HealthOut, summary="Liveness: the process answers")
def health() -> HealthOut:
    return HealthOut(status="ok")


def _check_broker(url: str, timeout: float) -> dict:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout, transport_options={"max_retries": 0}) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        return {"ok": True}
    except Exception as exc:  # any failure means "not ready", with the reason
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def _check_disk(settings: Settings) -> dict:
    """Free space in the data directory: below ``min_free_disk_bytes`` jobs and uploads will fail."""
    try:
        free = shutil.disk_usage(settings.resolved_data_dir).free
    except OSError as exc:
        return {"ok": False, "error": f"the data directory cannot be read ({exc.strerror})"}
    if free < settings.min_free_disk_bytes:
        return {
            "ok": False,
            "free_bytes": free,
            "error": "the data disk is full (or nearly): uploads and jobs will fail until space is freed",
        }
    return {"ok": True, "free_bytes": free}


def _is_admin(session, key: str | None) -> bool:
    from app.security import authenticate

    if not key or len(key) > 200:
        return False
    try:
        principal = authenticate(session, key)
    except Exception:  # no database, no details; the public answer still says "not ready"
        session.rollback()
        return False
    return principal is not None and principal.has_role("admin")


@router.get(
    "/ready",
    response_model=ReadyOut,
    response_model_exclude_none=True,
    summary="Readiness: database, broker, workers, data disk (details for admin keys)",
    description="Public callers get the status only; with an admin key in X-API-Key the answer "
    "also holds each check (workers with host:pid, the disk's free space) and versions.",
    responses={503: {"description": "Not ready", "model": ReadyOut}},
)
def ready(
    session: SessionDep,
    settings: SettingsDep,
    key: Annotated[str | None, Header(alias="X-API-Key", include_in_schema=False)] = None,
):
    checks: dict = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = {"ok": True}
    except Exception as exc:
        session.rollback()
        checks["database"] = {"ok": False, "error": f"{type(exc).__name__}"}
    checks["broker"] = _check_broker(settings.resolved_broker_url, settings.ready_worker_timeout_s)
    checks["disk"] = _check_disk(settings)
    workers = []
    if checks["database"]["ok"]:
        fresh_after = datetime.now(timezone.utc) - timedelta(seconds=WORKER_FRESH_S)
        for w in session.scalars(select(WorkerHeartbeat)).all():
            if as_utc(w.last_seen) >= fresh_after:
                workers.append({"name": w.name, "queues": w.queues, **(w.info or {})})
    checks["workers"] = {"ok": bool(workers), "count": len(workers), "workers": workers}
    checks["gpu"] = {
        "present": any(w.get("gpu") for w in workers),
        "devices": sorted({w.get("gpu_name") for w in workers if w.get("gpu_name")}),
    }
    ok = all(checks[name]["ok"] for name in ("database", "broker", "disk", "workers"))
    body = ReadyOut(status="ready" if ok else "not ready")
    if checks["database"]["ok"] and _is_admin(session, key):
        body.checks = checks
        body.versions = {"cellfuse": __version__, "cellpose": _version("cellpose"), "torch": _version("torch")}
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=200 if ok else 503)
