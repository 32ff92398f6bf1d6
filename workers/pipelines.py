"""Job pipelines: plain functions of a :class:`~workers.runner.JobContext`.

Each reads its inputs from the database and the blob store, writes under its own job folder, and
reports progress at checkpoints (where a cancellation takes effect).
"""

from __future__ import annotations

import time
from typing import Any

from workers.runner import JobContext, JobFailed


def run_noop(ctx: JobContext) -> dict[str, Any]:
    """A trivial built-in job: sleeps in steps and reports progress (for checking a deployment)."""
    steps = int(ctx.params.get("steps", 3))
    step_seconds = float(ctx.params.get("step_seconds", 0.2))
    for step in range(steps):
        ctx.progress(f"step {step + 1} of {steps}", step / steps)
        time.sleep(step_seconds)
    if ctx.params.get("fail"):
        raise JobFailed("this noop job was asked to fail")
    ctx.add_result("noop.json", b'{"ok": true}', kind="metrics", media_type="application/json")
    return {"steps": steps}


def run_finetune(ctx: JobContext) -> dict[str, Any]:
    from workers.science_pipelines import finetune_pipeline

    return finetune_pipeline(ctx)


def run_segment(ctx: JobContext) -> dict[str, Any]:
    from workers.science_pipelines import segment_pipeline

    return segment_pipeline(ctx)


def run_evaluate(ctx: JobContext) -> dict[str, Any]:
    from workers.science_pipelines import evaluate_pipeline

    return evaluate_pipeline(ctx)


def run_select_channels(ctx: JobContext) -> dict[str, Any]:
    from workers.science_pipelines import select_channels_pipeline

    return select_channels_pipeline(ctx)
