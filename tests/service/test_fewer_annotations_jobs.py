"""ISL pretraining and annotation-free (self-train) jobs over HTTP with a real worker."""

from __future__ import annotations

import pytest

from app.client import ApiError, CellFuseClient
from tests.service.conftest import make_client, wait_for_job
from tests.service.workflow import register_tiny_base, small_plate, upload_dataset

TINY_ISL = {"max_epochs": 2, "min_epochs": 0, "patience": 5, "batch_size": 4, "bsize": 64, "crops_per_pair": 1}
TINY_TRAINING = {"max_epochs": 2, "min_epochs": 0, "patience": 5, "batch_size": 4, "bsize": 64}


def _problem(call) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


@pytest.mark.slow
def test_pretrain_isl_then_self_train_over_http(embedded_settings, worker_factory):
    worker_factory(embedded_settings)
    client, _ = make_client(embedded_settings)
    api = CellFuseClient(client)
    tiny = register_tiny_base(api)
    fields = small_plate(6, size=96)
    assert fields[0].channel_names == ["cyto", "nuclear"]
    ds = upload_dataset(api, fields)

    # ISL: cyto -> nuclear stain, no masks read; the result is a base model with its card.
    job = api.run(
        "pretrain-isl",
        {
            "dataset_id": ds["id"],
            "source_channels": ["cyto"],
            "target_channel": "nuclear",
            "name": "isl-tiny",
            "init_base": tiny,
            "params": TINY_ISL,
        },
        timeout=300,
    )
    assert job["summary"]["training_curve"] and job["summary"]["name"] == "isl-tiny"
    bases = {b["name"]: b for b in api.get("/api/v1/base-models")}
    card = bases["isl-tiny"]["card"]
    assert bases["isl-tiny"]["source"] == "isl"
    assert card["training"]["pretext"] == "in-silico labelling" and card["parent"] == tiny
    assert card["metrics"]["pretext_val_l1"] > 0 and -1 <= card["metrics"]["val_correlation"] <= 1
    assert card["data"]["source_channels"] == ["cyto"] and card["data"]["target_channel"] == "nuclear"
    assert any(r["name"] == "model/card.json" for r in job["results"])
    # The same name again is a conflict; a fine-tune accepts the ISL model as its base.
    again = _problem(
        lambda: api.submit(
            "pretrain-isl",
            {"dataset_id": ds["id"], "source_channels": ["cyto"], "target_channel": "nuclear", "name": "isl-tiny"},
        )
    )
    assert again.status == 409
    tuned = api.run(
        "finetune",
        {
            "dataset_id": ds["id"],
            "reporter": "cyto",
            "object": "nuclei",
            "base": "isl-tiny",
            "params": {**TINY_TRAINING, "n_train": 4, "n_val": 1, "n_test": 1},
        },
        timeout=300,
    )
    version = api.get(f"/api/v1/models/{tuned['summary']['model_version_id']}")
    assert version["base_model"] == "isl-tiny" and version["pseudo_labelled"] is False

    # Self-training: markers from the nuclear stain, a cyto-reporter nuclei model with zero annotations.
    job = api.run(
        "self-train",
        {
            "dataset_id": ds["id"],
            "reporter": "cyto",
            "object": "nuclei",
            "marker_channel": "nuclear",
            "base": tiny,
            "self_train": {"epochs": 3},
            "params": TINY_TRAINING,
        },
        timeout=300,
    )
    summary = job["summary"]
    assert summary["pseudo_labelled"] is True and sum(summary["objects_per_image"]) > 0
    pseudo = [r for r in job["results"] if r["kind"] == "pseudo_labels"]
    assert len(pseudo) == len(fields)
    version = api.get(f"/api/v1/models/{summary['model_version_id']}")
    assert version["pseudo_labelled"] is True and version["status"] == "ready"
    assert version["card"]["extra"]["pseudo_labelled"] is True
    assert version["card"]["training"]["markers"] == {"channel": "nuclear"}
    assert version["test_metrics"]["against"].startswith("the dataset's annotations")
    listed = api.get("/api/v1/models", reporter="cyto", object="nuclei")
    assert [v["pseudo_labelled"] for v in listed if v["id"] == version["id"]] == [True]

    # Refusals before any job exists.
    body = {"dataset_id": ds["id"], "reporter": "cyto", "object": "nuclei"}
    assert _problem(lambda: api.submit("self-train", body)).status == 422  # no marker source
    assert (
        _problem(
            lambda: api.submit("self-train", {**body, "marker_channel": "nuclear", "marker_isl_model": "isl-tiny"})
        ).status
        == 422
    )
    not_isl = _problem(lambda: api.submit("self-train", {**body, "marker_isl_model": tiny}))
    assert not_isl.status == 422 and "not an ISL model" in not_isl.problem["detail"]
    assert _problem(lambda: api.submit("self-train", {**body, "marker_channel": "dapi"})).status == 422
    assert (
        _problem(
            lambda: api.submit(
                "pretrain-isl",
                {"dataset_id": ds["id"], "source_channels": ["nuclear"], "target_channel": "nuclear", "name": "x"},
            )
        ).status
        == 422
    )


@pytest.mark.slow
def test_pretrain_isl_can_be_cancelled_between_epochs(embedded_settings, worker_factory):
    worker_factory(embedded_settings)
    client, _ = make_client(embedded_settings)
    api = CellFuseClient(client)
    tiny = register_tiny_base(api)
    ds = upload_dataset(api, small_plate(4, size=96))
    job = api.submit(
        "pretrain-isl",
        {
            "dataset_id": ds["id"],
            "source_channels": ["cyto"],
            "target_channel": "nuclear",
            "name": "isl-cancelled",
            "init_base": tiny,
            "params": {**TINY_ISL, "max_epochs": 2000, "patience": 1000},
        },
    )
    deadline_job = wait_for_job(client, job["id"], statuses=("running",), timeout=120)
    assert deadline_job["status"] == "running"
    for _ in range(240):  # wait until an epoch has been reported
        current = client.get(f"/api/v1/jobs/{job['id']}").json()
        if "epoch" in (current.get("stage") or ""):
            break
        import time

        time.sleep(0.25)
    client.post(f"/api/v1/jobs/{job['id']}/cancel")
    final = wait_for_job(client, job["id"], timeout=120)
    assert final["status"] == "cancelled"
    assert "isl-cancelled" not in {b["name"] for b in api.get("/api/v1/base-models")}


@pytest.mark.slow
def test_self_train_shows_progress_and_can_be_cancelled_while_fine_tuning(embedded_settings, worker_factory):
    """Cancelled in its second phase, a self-train job leaves its pseudo-labelled version failed, not ready."""
    import time

    worker_factory(embedded_settings)
    client, _ = make_client(embedded_settings)
    api = CellFuseClient(client)
    tiny = register_tiny_base(api)
    ds = upload_dataset(api, small_plate(4, size=96))
    job = api.submit(
        "self-train",
        {
            "dataset_id": ds["id"],
            "reporter": "cyto",
            "object": "nuclei",
            "marker_channel": "nuclear",
            "base": tiny,
            "self_train": {"epochs": 10},
            "params": {**TINY_TRAINING, "max_epochs": 2000, "patience": 1000},
        },
    )
    # Progress is reported per epoch of both phases; the fraction only grows.
    stages: list[str] = []
    fractions: list[float] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        current = client.get(f"/api/v1/jobs/{job['id']}").json()
        assert current["status"] in ("queued", "running"), current
        if not stages or stages[-1] != current["stage"]:
            stages.append(current["stage"])
            fractions.append(current["progress"])
        if current["stage"].startswith("fine-tuning on pseudo-labels: epoch"):
            break
        time.sleep(0.1)
    # Each phase lasts seconds against a 0.1 s poll, so both are seen.
    assert any(s.startswith("pseudo-labelling") for s in stages), stages
    assert stages[-1].startswith("fine-tuning on pseudo-labels: epoch"), stages
    assert fractions == sorted(fractions) and 0.4 <= fractions[-1] < 1.0, (stages, fractions)
    version_id = current["summary"]["model_version_id"]
    assert api.get(f"/api/v1/models/{version_id}")["status"] == "training"

    client.post(f"/api/v1/jobs/{job['id']}/cancel")
    final = wait_for_job(client, job["id"], timeout=120)
    assert final["status"] == "cancelled"
    assert {"nuclear markers", "pseudo-labelling", "fine-tuning on pseudo-labels"} <= set(final["stage_timings"])
    version = api.get(f"/api/v1/models/{version_id}")
    assert version["status"] == "failed" and version["pseudo_labelled"] is True
    assert version_id not in {v["id"] for v in api.get("/api/v1/models", status="ready")}
