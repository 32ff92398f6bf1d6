"""Job pipelines, one module per job kind: plain functions of a :class:`~workers.runner.JobContext`.

Each reads its typed parameters (``app.job_params``) and inputs from the database and the blob
store, calls the pure science core, writes under its own job folder and reports progress at
checkpoints, where a cancellation takes effect. ``PIPELINE_MODULES`` maps a job kind to its module.
Modules that import torch are imported only when their job runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.runner import JobContext

#: Job kind -> module under ``workers.pipelines`` whose ``run(ctx)`` executes it.
PIPELINE_MODULES: dict[str, str] = {
    "noop": "noop",
    "finetune": "finetune",
    "segment": "segment",
    "evaluate": "evaluate",
    "select_channels": "select_channels",
    "pretrain_isl": "pretrain_isl",
    "self_train": "self_train",
}


def pipeline_for(kind: str) -> Callable[[JobContext], dict[str, Any] | None]:
    module = importlib.import_module(f"workers.pipelines.{PIPELINE_MODULES[kind]}")
    return module.run
