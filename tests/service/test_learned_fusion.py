"""Learned Flow Fusion over HTTP with a real worker: select-channels fits and stores the fusion
parameters with the channel set, GET shows them with the intervals, segmentation applies them by
default for that channel set and those model versions, and records what it used per field."""

from __future__ import annotations

import json

import pytest

from app.client import CellFuseClient
from tests.service.conftest import make_client
from tests.service.workflow import CELL_LINE, register_tiny_base, small_plate, upload_dataset

TINY_TRAINING = {"max_epochs": 2, "min_epochs": 0, "patience": 5, "batch_size": 4, "bsize": 64}
SPLITS = ["train", "train", "train", "train", "val", "test", "test", "val"]


@pytest.mark.slow
def test_select_channels_stores_fusion_parameters_and_segmentation_applies_them(embedded_settings, worker_factory):
    worker_factory(embedded_settings)
    client, _ = make_client(embedded_settings)
    api = CellFuseClient(client)
    base = register_tiny_base(api)
    fields = small_plate()
    channels = fields[0].channel_names
    ds = upload_dataset(api, fields, splits=SPLITS)
    versions = {}
    for reporter in channels:
        job = api.run(
            "finetune",
            {"dataset_id": ds["id"], "reporter": reporter, "object": "nuclei", "base": base, "params": TINY_TRAINING},
            timeout=300,
        )
        versions[reporter] = job["summary"]["model_version_id"]

    selection = api.run("select-channels", {"dataset_id": ds["id"], "object": "nuclei", "split": "val"}, timeout=300)
    summary = selection["summary"]
    for row in summary["ranking"]:
        low, high = row["f1_interval"]
        assert low <= row["f1"] <= high and row["n_fields"] == 2
        assert isinstance(row["within_noise_of_best"], bool)
    chosen = summary["chosen"]
    fitted = summary["fusion_parameters"]
    assert fitted["channels"] == chosen and fitted["models"] == {c: versions[c] for c in chosen}
    assert fitted["method"] in ("equal", "weights", "per_pixel") and abs(sum(fitted["weights"]) - 1) < 1e-4
    assert fitted["n_fields"] == 2 and fitted["cv_interval"][0] <= fitted["cv_f1"] <= fitted["cv_interval"][1]

    stored = api.get("/api/v1/channel-sets", cell_line=CELL_LINE)[0]
    assert stored["chosen"] == chosen and stored["fusion_parameters"]["weights"] == fitted["weights"]
    assert stored["fusion_parameters"]["cv_interval"] == fitted["cv_interval"]
    assert stored["chosen_f1_interval"] == next(r["f1_interval"] for r in summary["ranking"] if r["channels"] == chosen)

    # Default: the zoo's channel set with its fitted fusion; recorded in provenance and per field.
    job = api.run("segment-dataset", {"dataset_id": ds["id"], "split": "test", "objects": ["nuclei"]}, timeout=300)
    provenance = json.loads(api.download(next(r["url"] for r in job["results"] if r["name"] == "provenance.json")))
    assert provenance["fused_channels"]["nuclei"] == chosen
    assert provenance["fusion"]["nuclei"]["parameters"]["weights"] == fitted["weights"]
    assert provenance["fusion"]["nuclei"]["source"].startswith("channel set")
    for done in job["summary"]["fields"]:
        used = done["settings"]["nuclei"]
        assert used["channels"] == chosen and used["flow_threshold"] == fitted["flow_threshold"]
        assert used["cellprob_threshold"] == fitted["cellprob_threshold"] and used["confidence"] == fitted["confidence"]
        assert used["weights"] == pytest.approx(fitted["weights"], abs=1e-5)
        assert used["weights_source"].startswith("channel set")

    # Opting out gives equal weights and the fixed fused thresholds.
    job = api.run(
        "segment-dataset",
        {"dataset_id": ds["id"], "split": "test", "objects": ["nuclei"], "params": {"learned_fusion": False}},
        timeout=300,
    )
    used = job["summary"]["fields"][0]["settings"]["nuclei"]
    # (a one-channel set is not fused: its own maps get Cellpose's 0.4, not the fused 0.7)
    assert used["weights_source"] == "equal weights" and used["flow_threshold"] == (0.7 if len(chosen) > 1 else 0.4)
    assert used["weights"] == pytest.approx([1 / len(chosen)] * len(chosen), abs=1e-5)

    # A newer model for a channel of the set makes the fitted weights stale: they are not applied.
    api.run(
        "finetune",
        {
            "dataset_id": ds["id"],
            "reporter": chosen[0],
            "object": "nuclei",
            "base": base,
            "params": {**TINY_TRAINING, "seed": 1},
        },
        timeout=300,
    )
    job = api.run("segment-dataset", {"dataset_id": ds["id"], "split": "test", "objects": ["nuclei"]}, timeout=300)
    assert job["summary"]["fields"][0]["settings"]["nuclei"]["weights_source"] == "equal weights"
