"""This worker process's compute: its device, its precisions and its cache of loaded networks.

Resolved once per process, in the process that computes: a Celery prefork child resolves it in
``worker_process_init`` (or at its first job), never the parent, because a CUDA context created
before ``fork`` is unusable in the children (celery#3402). Keyed by pid, so a child never inherits
its parent's resolution. Importing this module does not import torch.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any

from app.settings import Settings, get_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerCompute:
    device: Any  # torch.device
    device_name: str
    precision: str  # inference: fp32 | bf16 | fp16
    training_precision: str
    cache: Any  # app.science.model_cache.ModelCache
    plate_batch_fields: int  # 0: by device

    def describe(self) -> dict[str, Any]:
        """What provenance records about where and how a job computed."""
        return {
            "device": str(self.device),
            "device_name": self.device_name,
            "precision": self.precision,
            "training_precision": self.training_precision,
        }


_by_pid: dict[int, WorkerCompute] = {}
_lock = threading.Lock()


def resolve_compute(settings: Settings) -> WorkerCompute:
    """Resolve ``settings``' device and precisions on this machine (may initialise CUDA)."""
    from app.science.device import device_name, resolve_device, resolve_precision
    from app.science.model_cache import ModelCache

    device = resolve_device(settings.device)
    return WorkerCompute(
        device=device,
        device_name=device_name(device),
        precision=resolve_precision(settings.precision, device),
        training_precision=resolve_precision(settings.training_precision, device, "training"),
        cache=ModelCache(settings.model_cache_bytes),
        plate_batch_fields=settings.plate_batch_fields,
    )


def worker_compute(settings: Settings | None = None) -> WorkerCompute:
    """This process's compute, resolved on first use."""
    pid = os.getpid()
    with _lock:
        compute = _by_pid.get(pid)
        if compute is None:
            compute = resolve_compute(settings or get_settings())
            _by_pid.clear()  # an inherited parent's entry is not ours
            _by_pid[pid] = compute
            log.info(
                "worker process %d computes on %s (%s), precision %s",
                pid,
                compute.device,
                compute.device_name,
                compute.precision,
            )
    return compute
