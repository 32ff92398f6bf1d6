"""A worker's presence row (queues, GPU, versions), refreshed while it runs; read by /ready."""

from __future__ import annotations

import logging
import os
import platform
import socket
import threading
from datetime import timedelta, timezone
from importlib import metadata
from pathlib import Path

from sqlalchemy import delete, select

from app.db import session_factory
from app.models import WorkerHeartbeat, utcnow
from app.settings import Settings

log = logging.getLogger(__name__)

PRESENCE_INTERVAL_S = 5.0


def nvidia_gpu_names(root: Path = Path("/proc/driver/nvidia/gpus")) -> list[str]:
    """Model names of the NVIDIA GPUs the driver lists, in PCI order, read from /proc.

    Read from the driver's files on purpose: asking torch (``torch.cuda.*``) would initialise CUDA
    in the prefork parent, and the pool processes forked after that could not use the GPU
    (celery#3402). Empty where there is no NVIDIA driver.
    """
    names = []
    try:
        folders = sorted(root.iterdir())
    except OSError:
        return []
    for folder in folders:
        try:
            for line in (folder / "information").read_text(errors="replace").splitlines():
                if line.startswith("Model:"):
                    names.append(line.split(":", 1)[1].strip())
                    break
        except OSError:
            continue
    return names


def _visible(names: list[str]) -> list[str]:
    """The GPUs CUDA_VISIBLE_DEVICES leaves visible (numeric lists only; else all)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return names
    try:
        return [names[int(i)] for i in visible.split(",") if i.strip() and int(i) < len(names)]
    except ValueError:  # GPU UUIDs: keep the driver's list
        return names


def _gpu_info(device_spec: str = "auto") -> dict:
    """The worker's device as configured and the GPU it names, without touching CUDA."""
    names = _visible(nvidia_gpu_names())
    spec = device_spec.strip().lower()
    if spec == "cpu" or not names:
        return {"gpu": False, "gpu_name": None, "device": spec}
    index = int(spec.split(":")[1]) if spec.startswith("cuda:") else 0
    return {"gpu": index < len(names), "gpu_name": names[index] if index < len(names) else None, "device": spec}


def _gpu_memory() -> dict:
    """Bytes allocated / reserved by this process and the device total, for /metrics."""
    try:
        import torch

        if torch.cuda.is_available():
            return {
                "gpu_memory_allocated": int(torch.cuda.memory_allocated(0)),
                "gpu_memory_reserved": int(torch.cuda.memory_reserved(0)),
                "gpu_memory_total": int(torch.cuda.get_device_properties(0).total_memory),
            }
    except Exception:
        log.debug("GPU memory probe failed", exc_info=True)
    return {}


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
    info = {**_gpu_info(settings.device), "versions": _versions(), "platform": platform.platform(terse=True)}
    factory = session_factory(settings.resolved_database_url)
    while True:
        try:
            with factory() as session:
                row = session.get(WorkerHeartbeat, name)
                current = {**info, **_gpu_memory()} if info.get("gpu") else info
                if row is None:
                    session.add(WorkerHeartbeat(name=name, queues=queues, info=current))
                else:
                    row.last_seen = utcnow()
                    if current is not info:
                        row.info = current
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
    return [
        r.name
        for r in rows
        if (r.last_seen if r.last_seen.tzinfo else r.last_seen.replace(tzinfo=timezone.utc)) >= cutoff
    ]
