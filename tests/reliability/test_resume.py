"""A segmentation whose worker dies mid-plate resumes on its next attempt: the fields the first
attempt finished are kept (results and all) and skipped, only the rest are segmented again. Both
routes (the batched plate engine, the default, and one field at a time); the engine's threads stop
with the attempt, and an ended attempt writes no heartbeat the reaper could mistake for a live one."""

from __future__ import annotations

import re
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import select

from app import jobs
from app.db import session_factory
from app.models import JobResult, utcnow
from tests.service.conftest import make_embedded_settings
from tests.service.workflow import ready_segmentation_job, small_plate


class _Killed(BaseException):
    """Stands for SIGKILL: nothing in the runner catches it, the job stays 'running'."""


#: The one progress report per field, with the field's number in the plate and its name.
FIELD_STAGE = re.compile(r"^field (\d+) of (\d+) \((.+)\)$")


def _new_engine_threads(before: set[threading.Thread]) -> list[str]:
    return [t.name for t in set(threading.enumerate()) - before if t.name.startswith("cellfuse-")]


def _requeue(factory) -> None:
    with factory() as session:
        actions = jobs.reap_stale_jobs(
            session, stale_after_s=0, resend_after_s=1e9, now=utcnow() + timedelta(seconds=1)
        )
        assert [a.action for a in actions] == ["requeued"]


@pytest.mark.slow
@pytest.mark.parametrize("route", ["plate", "per_field"])
def test_segmentation_rerun_skips_the_fields_already_finished(embedded_settings, monkeypatch, engine_starts, route):
    from workers.pipelines import pipeline_for
    from workers.runner import run_job

    monkeypatch.setattr(embedded_settings, "segment_route", route)
    client, factory, job_id, names = ready_segmentation_job(embedded_settings, small_plate(5, size=64, n_channels=1))
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
    threads_before = set(threading.enumerate())
    with pytest.raises(_Killed):
        run_job(job_id, dies_at_the_third_field, embedded_settings, worker="first")
    # On the plate route fields 3 and 4 were in the network together: the engine stops with the attempt.
    assert _new_engine_threads(threads_before) == []
    with factory() as session:
        first_results = {r.name: r.sha256 for r in session.scalars(select(JobResult).where(JobResult.job_id == job_id))}
    _requeue(factory)
    finished_first = {name.split("/")[0] for name in first_results if "/" in name}
    assert finished_first == set(names[:2])

    reported: list[tuple[str, float | None]] = []

    def reports_progress(ctx):
        progress = ctx.progress

        def checkpoint(stage=None, fraction=None, *args, **kwargs):
            if stage and FIELD_STAGE.match(stage):
                reported.append((stage, fraction))
            return progress(stage, fraction, *args, **kwargs)

        ctx.progress = checkpoint
        return segment(ctx)

    reports_progress.resumable = True
    assert run_job(job_id, reports_progress, embedded_settings, worker="second") == "succeeded"
    assert len(engine_starts) == (2 if route == "plate" else 0)  # the route under test is the one that ran
    # Progress stays exact per field: each unfinished field once, in plate order, at its share of the plate.
    assert reported == [(f"field {i + 1} of 5 ({names[i]})", i / 5) for i in (2, 3, 4)]
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["attempts"] == 2 and job["summary"]["fields_resumed"] == 2
    assert job["summary"]["fields_done"] == 5 and job["summary"]["fields_failed"] == 0
    assert [f["field"] for f in job["summary"]["fields"]] == names
    assert job["summary"]["metrics"]["nuclei"]  # pooled over all five fields, the kept ones included
    # The plate's QC covers all five fields too: the kept ones' rows come from their records.
    summary = job["summary"]
    assert summary["qc"]["summary"]["fields"] == 5
    qc_rows = {row["field"]: row["stats"]["nuclei"] for row in summary["qc_field_stats"]}
    assert set(qc_rows) == {f["field"] for f in summary["fields"]} and finished_first <= set(qc_rows)
    for f in summary["fields"]:
        assert qc_rows[f["field"]]["count"] == f["objects"]["nuclei"], (f, qc_rows[f["field"]])
    result_names = [r["name"] for r in job["results"]]
    assert len(result_names) == len(set(result_names))
    with factory() as session:
        rows = {r.name: r for r in session.scalars(select(JobResult).where(JobResult.job_id == job_id))}
        job_row = session.get(jobs.Job, job_id)
        for name, sha in first_results.items():
            if "/" in name:  # a kept field's file: the same row, written before the second attempt
                assert rows[name].sha256 == sha
                assert rows[name].created_at.replace(tzinfo=None) < job_row.started_at.replace(tzinfo=None)
        assert len({n.split("/")[0] for n in rows if "/" in n}) == 5
    assert not (embedded_settings.resolved_data_dir / "checkpoints" / job_id).exists()
    assert _new_engine_threads(threads_before) == []


@pytest.mark.slow
def test_a_plate_killed_while_writing_a_field_stops_its_engine_and_resumes(
    embedded_settings, monkeypatch, engine_starts
):
    from workers.pipelines import pipeline_for
    from workers.runner import run_job

    monkeypatch.setattr(embedded_settings, "segment_route", "plate")
    # Eight fields: more than the engine holds in flight, so its threads are still busy at the kill.
    client, factory, job_id, names = ready_segmentation_job(embedded_settings, small_plate(8, size=64, n_channels=1))
    segment = pipeline_for("segment")

    def dies_writing_the_third_field(ctx):
        add_result = ctx.add_result

        def add(name, *args, **kwargs):
            if name.startswith(f"{names[2]}/"):
                raise _Killed  # outside the engine's generator: between two of its fields
            return add_result(name, *args, **kwargs)

        ctx.add_result = add
        return segment(ctx)

    dies_writing_the_third_field.resumable = True
    threads_before = set(threading.enumerate())
    with pytest.raises(_Killed) as killed:
        run_job(job_id, dies_writing_the_third_field, embedded_settings, worker="first")
    # Stopped by the pipeline itself, not by the garbage collector: the traceback held here keeps
    # the pipeline's frames (and so its suspended generators) alive.
    assert killed.value is not None and _new_engine_threads(threads_before) == []
    assert engine_starts == [1]
    _requeue(factory)
    assert run_job(job_id, segment, embedded_settings, worker="second") == "succeeded"
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["summary"]["fields_resumed"] == 2 and job["summary"]["fields_done"] == 8
    assert [f["field"] for f in job["summary"]["fields"]] == names
    assert _new_engine_threads(threads_before) == []


@pytest.mark.slow
def test_a_plate_cancelled_mid_plate_stops_at_the_next_field(embedded_settings, monkeypatch, engine_starts):
    from workers.pipelines import pipeline_for
    from workers.runner import run_job

    monkeypatch.setattr(embedded_settings, "segment_route", "plate")
    client, factory, job_id, names = ready_segmentation_job(embedded_settings, small_plate(8, size=64, n_channels=1))
    segment = pipeline_for("segment")

    def cancelled_while_writing_the_third_field(ctx):
        add_result = ctx.add_result

        def add(name, *args, **kwargs):
            if name == f"{names[2]}/nuclei.tif":
                with factory() as other:  # the user clicks Cancel while the third field is written
                    jobs.request_cancel(other, job_id)
            return add_result(name, *args, **kwargs)

        ctx.add_result = add
        return segment(ctx)

    threads_before = set(threading.enumerate())
    assert run_job(job_id, cancelled_while_writing_the_third_field, embedded_settings, worker="w") == "cancelled"
    assert engine_starts == [1] and _new_engine_threads(threads_before) == []
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["partial_results"] is True
    # The field being written when the cancel came is finished; the cancel takes effect before the next.
    assert {r["name"].split("/")[0] for r in job["results"] if "/" in r["name"]} == set(names[:3])


def test_an_ended_attempt_writes_no_heartbeat_after_it(tmp_path, monkeypatch):
    """A beat in flight when the attempt dies lands before run_job ends, never after: a late beat
    moves heartbeat_at between the reaper's read and its compare-and-set re-queue."""
    from workers.runner import run_job

    settings = make_embedded_settings(tmp_path, job_heartbeat_s=0.05)
    factory = session_factory(settings.resolved_database_url)
    with factory() as session:
        job, _ = jobs.create_job(session, "noop", {}, max_attempts=3)
        session.commit()
        job_id = job.id
    in_flight = threading.Event()
    real_heartbeat = jobs.heartbeat

    def slow_heartbeat(session, job_id, worker):
        in_flight.set()
        time.sleep(0.3)  # a beat slowed by a busy database
        return real_heartbeat(session, job_id, worker)

    monkeypatch.setattr(jobs, "heartbeat", slow_heartbeat)

    def killed_during_a_beat(ctx):
        assert in_flight.wait(10)
        raise _Killed

    with pytest.raises(_Killed):
        run_job(job_id, killed_during_a_beat, settings, worker="first")
    with factory() as session:
        last_beat = session.get(jobs.Job, job_id).heartbeat_at
    time.sleep(0.6)
    with factory() as session:
        assert session.get(jobs.Job, job_id).heartbeat_at == last_beat
    _requeue(factory)


@pytest.mark.slow
def test_a_cancel_inside_a_single_field_stops_it_between_network_passes(embedded_settings, monkeypatch, engine_starts):
    """One long field on the plate route: its progress moves inside the field, and a cancel during
    the network stops it there (before, it ran the field to its end at 0 % and then stopped)."""
    import app.science.plate as plate
    from workers.pipelines import pipeline_for
    from workers.runner import run_job

    monkeypatch.setattr(embedded_settings, "segment_route", "plate")
    client, factory, job_id, names = ready_segmentation_job(embedded_settings, small_plate(1, size=64, n_channels=1))
    real_forward = plate.forward_fields
    passes: list[int] = []

    def slow_forward(*args, **kwargs):
        with factory() as other:  # the user clicks Cancel while the field is in the network
            jobs.request_cancel(other, job_id)
        time.sleep(2.5)  # a long pass: the job thread reports and sees the cancel meanwhile
        passes.append(1)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(plate, "forward_fields", slow_forward)
    segment = pipeline_for("segment")
    reported: list[tuple[str | None, float | None]] = []

    def recording(ctx):
        progress = ctx.progress

        def report(stage=None, fraction=None, **kwargs):
            reported.append((stage, fraction))
            return progress(stage, fraction, **kwargs)

        ctx.progress = report
        return segment(ctx)

    assert run_job(job_id, recording, embedded_settings, worker="w") == "cancelled"
    assert engine_starts == [1] and passes == [1]
    inside = [(s, f) for s, f in reported if s and s.startswith(f"field 1 of 1 ({names[0]}): network")]
    assert inside and all(f is not None and 0 < f < 1 for _, f in inside), reported
    job = client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled"
    assert not [r for r in job["results"] if r["name"].startswith(f"{names[0]}/")]  # the field was not finished
