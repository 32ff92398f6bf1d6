"""A segmentation whose worker dies mid-plate resumes on its next attempt: the fields the first
attempt finished are kept (results and all) and skipped, only the rest are segmented again."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from app import jobs
from app.client import CellFuseClient
from app.db import session_factory
from app.models import BaseModel, CellLine, JobResult, ModelVersion, Reporter, utcnow
from tests.reliability.conftest import make_client
from tests.service.workflow import register_tiny_base, small_plate, upload_dataset


class _Killed(BaseException):
    """Stands for SIGKILL: nothing in the runner catches it, the job stays 'running'."""


@pytest.mark.slow
def test_segmentation_rerun_skips_the_fields_already_finished(embedded_settings):
    from workers.pipelines import pipeline_for
    from workers.runner import run_job

    client, _ = make_client(embedded_settings, run_reaper=False)
    api = CellFuseClient(client)
    base_name = register_tiny_base(api)
    fields = small_plate(5, size=64, n_channels=1)
    ds = upload_dataset(api, fields)
    factory = session_factory(embedded_settings.resolved_database_url)
    with factory() as session:  # a ready zoo version (the tiny base's weights) for the one reporter
        base = session.scalar(select(BaseModel).where(BaseModel.name == base_name))
        session.add(
            ModelVersion(
                cell_line_id=session.scalar(select(CellLine.id)),
                object="nuclei",
                version=1,
                reporter_id=session.scalar(select(Reporter.id)),
                status="ready",
                weights_sha256=base.weights_sha256,
                card=base.card,
                diameter=17.0,
            )
        )
        session.commit()
    response = client.post("/api/v1/jobs/segment-dataset", json={"dataset_id": ds["id"], "objects": ["nuclei"]})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]

    segment = pipeline_for("segment")

    def dies_at_the_third_field(ctx):
        progress = ctx.progress

        def checkpoint(stage=None, *args, **kwargs):
            if stage and stage.startswith("field 3 of"):
                raise _Killed
            return progress(stage, *args, **kwargs)

        ctx.progress = checkpoint
        return segment(ctx)

    dies_at_the_third_field.resumable = True
    with pytest.raises(_Killed):
        run_job(job_id, dies_at_the_third_field, embedded_settings, worker="first")
    with factory() as session:
        first_results = {r.name: r.sha256 for r in session.scalars(select(JobResult).where(JobResult.job_id == job_id))}
        actions = jobs.reap_stale_jobs(
            session, stale_after_s=0, resend_after_s=1e9, now=utcnow() + timedelta(seconds=1)
        )
        assert [a.action for a in actions] == ["requeued"]
    finished_first = {name.split("/")[0] for name in first_results if "/" in name}
    assert len(finished_first) == 2

    assert run_job(job_id, segment, embedded_settings, worker="second") == "succeeded"
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["attempts"] == 2 and job["summary"]["fields_resumed"] == 2
    assert job["summary"]["fields_done"] == 5 and job["summary"]["fields_failed"] == 0
    assert job["summary"]["metrics"]["nuclei"]  # pooled over all five fields, the kept ones included
    # The plate's QC covers all five fields too: the kept ones' rows come from their records.
    summary = job["summary"]
    assert summary["qc"]["summary"]["fields"] == 5
    qc_rows = {row["field"]: row["stats"]["nuclei"] for row in summary["qc_field_stats"]}
    assert set(qc_rows) == {f["field"] for f in summary["fields"]} and finished_first <= set(qc_rows)
    for f in summary["fields"]:
        assert qc_rows[f["field"]]["count"] == f["objects"]["nuclei"], (f, qc_rows[f["field"]])
    names = [r["name"] for r in job["results"]]
    assert len(names) == len(set(names))
    with factory() as session:
        rows = {r.name: r for r in session.scalars(select(JobResult).where(JobResult.job_id == job_id))}
        job_row = session.get(jobs.Job, job_id)
        for name, sha in first_results.items():
            if "/" in name:  # a kept field's file: the same row, written before the second attempt
                assert rows[name].sha256 == sha
                assert rows[name].created_at.replace(tzinfo=None) < job_row.started_at.replace(tzinfo=None)
        assert len({n.split("/")[0] for n in rows if "/" in n}) == 5
    assert not (embedded_settings.resolved_data_dir / "checkpoints" / job_id).exists()
