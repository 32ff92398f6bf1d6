"""A trivial built-in job: sleeps in steps and reports progress (for checking a deployment)."""

from __future__ import annotations

import time
from typing import Any

from app.job_params import NoopJob
from workers.runner import JobContext, JobFailed


def run(ctx: JobContext) -> dict[str, Any]:
    p = ctx.params_as(NoopJob)
    for step in range(p.steps):
        ctx.progress(f"step {step + 1} of {p.steps}", step / p.steps)
        time.sleep(p.step_seconds)
    if p.fail:
        raise JobFailed("this noop job was asked to fail")
    ctx.add_result("noop.json", b'{"ok": true}', kind="metrics", media_type="application/json")
    return {"steps": p.steps}
