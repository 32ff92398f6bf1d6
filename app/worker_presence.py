"""A worker's presence row (queues, GPU, versions), refreshed while it runs; read by /ready."""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading
from datetime import timedelta, timezone
from importlib import metadata

from sqlalchemy import delete, select

from app.db import session_factory
from app.models import WorkerHeartbeat, utcnow
from app.settings import Settings

log = logging.getLogger(__name__)

PRESENCE_INTERVAL_S = 5.0


def _gpu_info() -> dict:
    try:
        import torch

        if torch.cuda.is_available():
            return {"gpu": True, "gpu_name": torch.cuda.get_device_name(0)}
    except Exception:  # no torch or a broken driver: report "no GPU", keep running
        log.debug("GPU probe failed", exc_info=True)
    return {"gpu": False, "gpu_name": None}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("cellfuse", "cellpose", "torch"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def presence_loop(stop: threading.Event, settings: Settings, queues: list[str]) -> None:
    name = f"{socket.gethostname()}:{os.getpid()}"
    info = {**_gpu_info(), "versions": _versions(), "platform": platform.platform(terse=True)}
    factory = session_factory(settings.resolved_database_url)
    while True:
        try:
            with factory() as session:
                row = session.get(WorkerHeartbeat, name)
                if row is None:
                    session.add(WorkerHeartbeat(name=name, queues=queues, info=info))
                else:
                    row.last_seen = utcnow()
                session.commit()
        except Exception:
            log.warning("could not record worker presence", exc_info=True)
        if stop.wait(PRESENCE_INTERVAL_S):
            break
    try:
        with factory() as session:
            session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.name == name))
            session.commit()
    except Exception:
        log.debug("could not remove worker presence", exc_info=True)


def live_workers_on_host(settings: Settings, max_age_s: float, host: str | None = None) -> list[str]:
    """This host's workers whose presence row is younger than ``max_age_s`` (a container healthcheck).

    The presence thread runs beside the work, so a worker busy with a long job still counts as alive;
    one whose process died or lost the database does not.
    """
    host = host or socket.gethostname()
    cutoff = utcnow() - timedelta(seconds=max_age_s)
    with session_factory(settings.resolved_database_url)() as session:
        rows = session.scalars(
            select(WorkerHeartbeat).where(WorkerHeartbeat.name.startswith(f"{host}:", autoescape=True))
        ).all()
    # SQLite hands back naive datetimes; every timestamp stored is UTC.
    return [r.name for r in rows if (r.last_seen if r.last_seen.tzinfo else r.last_seen.replace(tzinfo=timezone.utc))
            >= cutoff]
