"""Defects of the job contract, each once silent: duplicate plate fields, a misspelt alias, a test
set re-encoded, a dead worker counted as ready, racing version numbers, a stalled job, a cancel
after the last checkpoint, a deleted reporter."""

from __future__ import annotations

import io
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import tifffile
from sqlalchemy import select

from app import jobs
from app.api.routes.submit import _uploaded_field_names, field_name
from app.api.schemas import SegmentRequest
from app.db import session_factory
from app.job_params import JOB_PARAMS, FinetuneJob, SegmentJob
from app.models import CellLine, Job, ModelVersion, Reporter, WorkerHeartbeat, utcnow
from app.science.image_files import content_digest, read_image, read_labels
from tests.service.conftest import make_client, make_embedded_settings
from workers.pipelines import pipeline_for
from workers.pipelines.common import evaluation_set_identity
from workers.runner import run_job


def _tiff(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


# --- duplicate and distinct field names -----------------------------------------------------------


def test_fields_zero_and_one_of_a_well_get_distinct_names():
    req = SegmentRequest(
        cell_line="x", channels=["a"], fields=[{"well": "A06", "field": 0}, {"well": "A06", "field": 1}]
    )
    assert _uploaded_field_names(req, 2) == ["A06-0", "A06-1"]


def test_long_well_names_are_kept_whole():
    long_well = "PLATE7_ROW_A_COL_12"
    assert field_name(long_well, 2) == f"{long_well}-2"


def test_a_plate_naming_one_field_twice_is_refused_before_anything_is_stored(embedded_settings):
    client, _ = make_client(embedded_settings)
    client.post("/api/v1/cell-lines", json={"name": "HeLa"})
    client.post("/api/v1/reporters", json={"name": "GFP"})
    request = {
        "cell_line": "HeLa",
        "channels": ["GFP"],
        "fields": [{"well": "B2", "field": 1}, {"well": "B2", "field": 1}],
    }
    tiff = _tiff(np.zeros((32, 32), np.uint16))
    response = client.post(
        "/api/v1/jobs/segment",
        data={"request": SegmentRequest(**request).model_dump_json()},
        files=[("files", ("a.tif", tiff, "image/tiff")), ("files", ("b.tif", tiff, "image/tiff"))],
    )
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["type"].endswith("duplicate-fields") and "B2" in body["detail"], body
    assert list((embedded_settings.blob_dir).rglob("*.tif")) == []


def test_dataset_fields_get_distinct_names_with_their_plate():
    """The demo's path (segment-dataset): fields 0 and 1 of a well, two plates with the same well, and
    a repeated image each keep a result set of their own."""
    from app.api.routes.submit import _dataset_field_names

    images = [
        SimpleNamespace(id=1, well="A06", field=0, plate=None),
        SimpleNamespace(id=2, well="A06", field=1, plate=None),
        SimpleNamespace(id=3, well="A06", field=1, plate="P2"),
        SimpleNamespace(id=4, well="A06", field=1, plate=None),
        SimpleNamespace(id=5, well=None, field=None, plate=None),
    ]
    names = _dataset_field_names(images)
    assert names == ["A06-0", "A06-1", "P2_A06-1", "A06-1-image-4", "image-5"]
    assert len(set(names)) == len(images)


def test_sanitised_names_that_clash_are_refused():
    req = SegmentRequest(
        cell_line="x", channels=["a"], fields=[{"well": "A 1", "field": 1}, {"well": "A_1", "field": 1}]
    )
    from app.api.errors import Problem

    with pytest.raises(Problem) as caught:
        _uploaded_field_names(req, 2)
    assert caught.value.status == 422


# --- aliases ------------------------------------------------------------------------------------


def test_a_misspelt_alias_is_a_422_not_the_latest_models(embedded_settings):
    client, _ = make_client(embedded_settings)
    client.post("/api/v1/cell-lines", json={"name": "HeLa"})
    client.post("/api/v1/reporters", json={"name": "GFP"})
    request = SegmentRequest(cell_line="HeLa", channels=["GFP"], alias="prodution")
    response = client.post(
        "/api/v1/jobs/segment",
        data={"request": request.model_dump_json()},
        files=[("files", ("a.tif", _tiff(np.zeros((32, 32), np.uint16)), "image/tiff"))],
    )
    assert response.status_code == 422, response.text
    assert response.json()["type"].endswith("unknown-alias")
    assert "prodution" in response.json()["detail"]


# --- test-set identity --------------------------------------------------------------------------


def test_a_re_encoded_test_set_keeps_its_identity():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (2, 48, 48)).astype(np.uint16)
    mask = np.zeros((48, 48), np.int32)
    mask[5:15, 5:15], mask[20:30, 20:40] = 3, 9
    plain = _tiff(image, metadata={"axes": "CYX"})
    ome = _tiff(image, ome=True, compression="zlib", metadata={"axes": "CYX", "Channel": {"Name": ["a", "b"]}})
    relabelled = _tiff(np.where(mask == 3, 1, np.where(mask == 9, 2, 0)).astype(np.uint16))
    assert plain != ome  # different bytes...
    first = content_digest(read_image(plain).data, read_labels(_tiff(mask.astype(np.uint16))))
    second = content_digest(read_image(ome).data, read_labels(relabelled))
    assert first == second  # ...same pixels and masks
    assert evaluation_set_identity([first, "x"]) == evaluation_set_identity(["x", second])
    other = content_digest(read_image(plain).data[::-1], read_labels(relabelled))
    assert other != first


# --- readiness ----------------------------------------------------------------------------------


def test_ready_ignores_a_worker_not_seen_within_the_heartbeat_window(embedded_settings):
    client, _ = make_client(embedded_settings, run_reaper=False)
    with session_factory(embedded_settings.resolved_database_url)() as session:
        session.add(WorkerHeartbeat(name="dead:1", queues=["gpu"], info={}, last_seen=utcnow() - timedelta(seconds=20)))
        session.commit()
    body = client.get("/ready").json()
    assert body["checks"]["workers"]["count"] == 0


# --- typed parameters -----------------------------------------------------------------------------


def test_every_job_kind_has_a_typed_parameter_model():
    from app.queue import TASK_ROUTES, TASK_TIME_LIMITS
    from workers.pipelines import PIPELINE_MODULES

    assert set(JOB_PARAMS) >= {"noop", "finetune", "segment", "evaluate", "select_channels"}
    # One list of job kinds: each has its parameters, its task and queue, its time limits and its pipeline.
    assert set(JOB_PARAMS) == set(TASK_ROUTES) == set(TASK_TIME_LIMITS) == set(PIPELINE_MODULES)
    with pytest.raises(ValueError):
        SegmentJob.model_validate({"cell_line": "x"})


# --- version numbers under concurrency --------------------------------------------------------------


def test_a_fine_tune_that_loses_the_version_number_race_takes_the_next(embedded_settings, monkeypatch):
    from app import zoo
    from workers.pipelines import finetune

    factory = session_factory(embedded_settings.resolved_database_url)
    with factory() as session:
        line, reporter = CellLine(name="L"), Reporter(name="R")
        session.add_all([line, reporter])
        session.commit()
        session.add(
            ModelVersion(cell_line_id=line.id, reporter_id=reporter.id, object="nuclei", version=1, status="training")
        )
        session.commit()
        stale = iter([1])  # the first read happened before the other fine-tune committed version 1
        real = zoo.next_version_number
        monkeypatch.setattr(zoo, "next_version_number", lambda *a: next(stale, None) or real(*a))
        version = finetune._create_version(
            SimpleNamespace(session=session),
            cell_line_id=line.id,
            reporter_id=reporter.id,
            object="nuclei",
            status="training",
        )
        assert version.version == 2


# --- stalled and cancelled jobs ---------------------------------------------------------------------


def _queued_job(settings, kind: str = "noop", params: dict | None = None) -> str:
    with session_factory(settings.resolved_database_url)() as session:
        job, _ = jobs.create_job(session, kind, params or {}, max_attempts=3)
        session.commit()
        return job.id


def test_a_job_that_stops_reaching_checkpoints_is_treated_as_stalled(tmp_path):
    settings = make_embedded_settings(tmp_path, job_heartbeat_s=0.1, job_stall_after_s=0.5, job_stale_after_s=1.0)
    job_id = _queued_job(settings)
    release = threading.Event()

    def hung_pipeline(ctx):
        release.wait(10)  # no checkpoint: a hung library call
        return {}

    runner = threading.Thread(target=run_job, args=(job_id, hung_pipeline, settings, "w1"))
    runner.start()
    try:
        # Stall (0.5 s after the last progress, seen up to ~1 s late on a busy machine) + stale (1 s),
        # with a margin: at 2 s a heartbeat could still be fresh once in several runs.
        time.sleep(3.0)
        with session_factory(settings.resolved_database_url)() as session:
            actions = jobs.reap_stale_jobs(session, stale_after_s=1.0, resend_after_s=60)
            assert [a.job_id for a in actions if a.action == "requeued"] == [job_id]
    finally:
        release.set()
        runner.join(10)
    with session_factory(settings.resolved_database_url)() as session:
        assert session.get(Job, job_id).status == "queued"  # the hung attempt did not finish it


def test_every_task_has_time_limits_below_the_redis_visibility_timeout(tmp_path):
    from app.queue import REDIS_VISIBILITY_TIMEOUT_S, TASK_ROUTES, TASK_TIME_LIMITS, make_celery
    from app.settings import Settings
    from workers.celery_app import celery_app
    from workers.tasks import noop_task  # noqa: F401  (registers the tasks)

    for kind, (task_name, _queue) in TASK_ROUTES.items():
        task = celery_app.tasks[task_name]
        soft, hard = TASK_TIME_LIMITS[kind]
        assert (task.soft_time_limit, task.time_limit) == (soft, hard), kind
        assert soft < hard < REDIS_VISIBILITY_TIMEOUT_S, kind  # else Redis re-delivers a running job
    redis_app = make_celery(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0"))
    assert redis_app.conf.broker_transport_options["visibility_timeout"] == REDIS_VISIBILITY_TIMEOUT_S


def test_a_job_past_its_soft_time_limit_fails_with_the_reason(embedded_settings):
    from billiard.exceptions import SoftTimeLimitExceeded

    job_id = _queued_job(embedded_settings)

    def overlong(ctx):
        raise SoftTimeLimitExceeded()  # what Celery raises inside the task at the soft limit

    assert run_job(job_id, overlong, embedded_settings, worker="w1") == "failed"
    with session_factory(embedded_settings.resolved_database_url)() as session:
        assert "time limit" in session.get(Job, job_id).error


def test_a_cancel_after_the_last_checkpoint_ends_cancelled_not_succeeded(embedded_settings):
    job_id = _queued_job(embedded_settings)

    def pipeline(ctx):
        ctx.add_result("part.json", b"{}", kind="metrics", media_type="application/json")
        with session_factory(embedded_settings.resolved_database_url)() as other:
            jobs.request_cancel(other, job_id)  # the user clicks Cancel during the last field
        return {"fields_done": 1}

    assert run_job(job_id, pipeline, embedded_settings, worker="w1") == "cancelled"
    with session_factory(embedded_settings.resolved_database_url)() as session:
        job = session.get(Job, job_id)
        assert job.status == "cancelled" and "partial" in job.error
        assert job.summary["partial_results"] is True and job.summary["fields_done"] == 1


def test_a_cancel_seen_at_an_epoch_checkpoint_fails_the_version_in_training(embedded_settings):
    """A training pipeline's on_epoch reports progress; the cancel raises there, past the pipeline's
    own clean-up: the version must still end 'failed', not 'training' for ever (fine-tune, self-train)."""
    job_id = _queued_job(embedded_settings)
    factory = session_factory(embedded_settings.resolved_database_url)

    def pipeline(ctx):
        line, reporter = CellLine(name="L"), Reporter(name="R")
        ctx.session.add_all([line, reporter])
        ctx.session.commit()
        ctx.session.add(
            ModelVersion(
                cell_line_id=line.id,
                reporter_id=reporter.id,
                object="nuclei",
                version=1,
                status="training",
                job_id=job_id,
            )
        )
        ctx.session.commit()
        with factory() as other:
            jobs.request_cancel(other, job_id)
        ctx.progress("training: epoch 3 of at most 300", 0.1, force=True)  # raises JobCancelled
        raise AssertionError("the checkpoint did not stop the job")

    assert run_job(job_id, pipeline, embedded_settings, worker="w1") == "cancelled"
    with factory() as session:
        assert session.scalar(select(ModelVersion.status).where(ModelVersion.job_id == job_id)) == "failed"


def test_a_result_name_is_never_replaced_by_another_write(embedded_settings):
    job_id = _queued_job(embedded_settings)

    def pipeline(ctx):
        ctx.add_result("A1-1/nuclei.tif", b"first", kind="nuclei_mask", media_type="image/tiff")
        ctx.add_result("A1-1/nuclei.tif", b"second", kind="nuclei_mask", media_type="image/tiff")

    assert run_job(job_id, pipeline, embedded_settings, worker="w1") == "failed"


@pytest.mark.slow
def test_a_running_fine_tune_cancelled_between_epochs_ends_cancelled_and_fails_its_version(embedded_settings):
    from app.client import CellFuseClient
    from tests.service.workflow import register_tiny_base, small_plate, upload_dataset

    client, _ = make_client(embedded_settings, run_reaper=False)
    api = CellFuseClient(client)
    base = register_tiny_base(api)
    ds = upload_dataset(api, small_plate(n_fields=4, size=64))
    reporter = ds["channels"][0]
    many_epochs = {"max_epochs": 2000, "min_epochs": 2000, "patience": 1000, "batch_size": 2, "bsize": 64}
    params = FinetuneJob(
        dataset_id=ds["id"],
        reporter=reporter,
        object="nuclei",
        base=base,
        cell_line=ds["cell_line"],
        params=many_epochs,
    ).model_dump(mode="json")
    job_id = _queued_job(embedded_settings, "finetune", params)
    factory = session_factory(embedded_settings.resolved_database_url)

    def cancel_after_an_epoch() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with factory() as other:
                if (other.get(Job, job_id).summary or {}).get("training_curve"):
                    jobs.request_cancel(other, job_id)  # the user clicks Cancel mid-training
                    return
            time.sleep(0.2)

    canceller = threading.Thread(target=cancel_after_an_epoch)
    canceller.start()
    try:
        outcome = run_job(job_id, pipeline_for("finetune"), embedded_settings, worker="w1")
    finally:
        canceller.join(250)
    assert outcome == "cancelled"
    with factory() as session:
        job = session.get(Job, job_id)
        assert job.status == "cancelled" and 0 < len(job.summary["training_curve"]) < 2000
        [version] = session.scalars(select(ModelVersion).where(ModelVersion.job_id == job_id)).all()
        assert version.status == "failed"  # never "ready", never left "training"


def test_a_deleted_reporter_fails_the_fine_tune_with_a_clear_reason(embedded_settings):
    from tests.service.workflow import small_plate, upload_dataset
    from app.client import CellFuseClient

    client, _ = make_client(embedded_settings, run_reaper=False)
    api = CellFuseClient(client)
    ds = upload_dataset(api, small_plate(n_fields=3, size=64))
    reporter = ds["channels"][0]
    with session_factory(embedded_settings.resolved_database_url)() as session:
        session.delete(session.scalar(select(Reporter).where(Reporter.name == reporter)))
        session.commit()
    params = FinetuneJob(
        dataset_id=ds["id"], reporter=reporter, object="nuclei", base="cellfuse-base", cell_line=ds["cell_line"]
    ).model_dump(mode="json")
    job_id = _queued_job(embedded_settings, "finetune", params)
    assert run_job(job_id, pipeline_for("finetune"), embedded_settings, worker="w1") == "failed"
    with session_factory(embedded_settings.resolved_database_url)() as session:
        error = session.get(Job, job_id).error
    assert "internal error" not in error and "deleted" in error, error
