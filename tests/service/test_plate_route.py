"""The plate route (the default) records what the one-field route records: a field too large for a
batch goes to the one-field route and is segmented in blocks, in its place in the plate."""

from __future__ import annotations

import re
import threading
from dataclasses import replace

from app.jobs import JobStatus
from tests.service.workflow import ready_segmentation_job, small_plate


def test_a_field_above_the_block_limit_is_segmented_in_blocks_in_its_place(tmp_path, monkeypatch, engine_starts):
    import app.science.blocked as blocked_module
    from tests.service.conftest import make_embedded_settings
    from workers.pipelines import pipeline_for
    from workers.runner import run_job

    real_blocked = blocked_module.segment_blocked
    engine_threads_during_blocks: list[list[str]] = []

    def segment_blocked(*args, **kwargs):
        # Blocked segmentation swaps modules of the shared nets: no engine thread may run beside it.
        engine_threads_during_blocks.append([t.name for t in threading.enumerate() if t.name.startswith("cellfuse-")])
        return real_blocked(*args, **kwargs)

    monkeypatch.setattr(blocked_module, "segment_blocked", segment_blocked)

    # 64² fields go through the batched engine, 96² ones (over 80²) through blocked segmentation.
    settings = make_embedded_settings(tmp_path, segment_block_pixels=80 * 80)
    assert settings.segment_route == "plate"  # the default
    small = small_plate(3, size=64, n_channels=1)
    large = [replace(f, well="B01", field=i) for i, f in enumerate(small_plate(2, size=96, n_channels=1, seed=5))]
    client, _factory, job_id, names = ready_segmentation_job(
        settings, [small[0], large[0], small[1], large[1], small[2]]
    )
    segment = pipeline_for("segment")
    stages: list[str] = []

    def reports_progress(ctx):
        progress = ctx.progress

        def checkpoint(stage=None, *args, **kwargs):
            if stage and re.fullmatch(r"field \d+ of \d+ \(.+\)", stage):
                stages.append(stage)
            return progress(stage, *args, **kwargs)

        ctx.progress = checkpoint
        return segment(ctx)

    assert run_job(job_id, reports_progress, settings, worker="w") == JobStatus.SUCCEEDED.value
    assert engine_starts == [1, 1, 1]  # a new engine after each blocked field
    assert engine_threads_during_blocks == [[], []]
    assert stages == [f"field {i + 1} of 5 ({name})" for i, name in enumerate(names)]  # each once, in order
    summary = client.get(f"/api/v1/jobs/{job_id}").json()["summary"]
    assert summary["fields_failed"] == 0 and [f["field"] for f in summary["fields"]] == names
    blocked = {f["field"]: bool(f["settings"]["nuclei"].get("blocked")) for f in summary["fields"]}
    assert blocked == {name: name.startswith("B01") for name in names}
