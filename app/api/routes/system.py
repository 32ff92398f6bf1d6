"""Liveness and readiness."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from importlib import metadata

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import select, text

from app import __version__
from app.api.deps import SessionDep, SettingsDep
from app.api.schemas import HealthOut, ReadyOut, as_utc
from app.models import WorkerHeartbeat
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


@router.get("/ready", response_model=ReadyOut, summary="Readiness: database, broker, workers, GPU",
            responses={503: {"description": "Not ready", "model": ReadyOut}})
def ready(session: SessionDep, settings: SettingsDep):
    checks: dict = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = {"ok": True}
    except Exception as exc:
        checks["database"] = {"ok": False, "error": f"{type(exc).__name__}"}
    checks["broker"] = _check_broker(settings.resolved_broker_url, settings.ready_worker_timeout_s)
    workers = []
    if checks["database"]["ok"]:
        fresh_after = datetime.now(timezone.utc) - timedelta(seconds=WORKER_FRESH_S)
        for w in session.scalars(select(WorkerHeartbeat)).all():
            if as_utc(w.last_seen) >= fresh_after:
                workers.append({"name": w.name, "queues": w.queues, **(w.info or {})})
    checks["workers"] = {"ok": bool(workers), "count": len(workers), "workers": workers}
    checks["gpu"] = {"present": any(w.get("gpu") for w in workers),
                     "devices": sorted({w.get("gpu_name") for w in workers if w.get("gpu_name")})}
    ok = checks["database"]["ok"] and checks["broker"]["ok"] and checks["workers"]["ok"]
    body = ReadyOut(status="ready" if ok else "not ready", checks=checks,
                    versions={"cellfuse": __version__, "cellpose": _version("cellpose"),
                              "torch": _version("torch")})
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ok else 503)
