"""The whole zoo and job API over HTTP with a real worker: register, upload, fine-tune, move an
alias, select channels, segment a plate with Flow Fusion and a baseline, evaluate, download."""

from __future__ import annotations

import csv
import io
import json
import zipfile

import numpy as np
import pytest
from PIL import Image

from app.client import ApiError, CellFuseClient, segment_files
from tests.service.conftest import make_client
from tests.service.workflow import (
    CELL_LINE,
    field_tiff,
    register_tiny_base,
    small_plate,
    tiff_to_array,
    upload_dataset,
)

TINY_TRAINING = {"max_epochs": 2, "min_epochs": 0, "patience": 5, "batch_size": 4, "bsize": 64}
SPLITS = ["train", "train", "train", "train", "val", "test", "test", "val"]


def _finetune(api: CellFuseClient, ds: dict, reporter: str, obj: str, base: str, seed: int = 0) -> dict:
    job = api.run(
        "finetune",
        {
            "dataset_id": ds["id"],
            "reporter": reporter,
            "object": obj,
            "base": base,
            "params": {**TINY_TRAINING, "seed": seed},
        },
        timeout=300,
    )
    assert job["summary"]["training_curve"], job
    return api.get(f"/api/v1/models/{job['summary']['model_version_id']}")


def run_workflow(settings, worker_factory) -> None:
    worker_factory(settings)
    client, _ = make_client(settings)
    api = CellFuseClient(client)
    base = register_tiny_base(api)
    fields = small_plate()
    channels = fields[0].channel_names
    ds = upload_dataset(api, fields, splits=SPLITS)
    assert ds["split_counts"] == {"train": 4, "val": 2, "test": 2}

    # One model per (reporter, object); a second nuclei version of the first reporter for the alias.
    versions = {(r, o): _finetune(api, ds, r, o, base) for r in channels for o in ("nuclei", "cells")}
    first = versions[(channels[0], "nuclei")]
    assert first["status"] == "ready" and first["version"] == 1 and first["weights_sha256"]
    assert first["training_curve"] and "f1" in first["test_metrics"] and first["diameter"] > 0
    assert first["card"]["parent"] == base and first["base_model"] == base
    second = _finetune(api, ds, channels[0], "nuclei", f"version:{first['id']}", seed=1)
    assert second["version"] == 2 and second["parent_version_id"] == first["id"]

    # Aliases: the first move is free; a worse candidate is refused unless forced; moves are recorded.
    alias_path = f"/api/v1/aliases/{CELL_LINE}/{channels[0]}/nuclei/production"
    api.put(alias_path, {"version_id": first["id"]})
    better, worse = sorted([first, second], key=lambda v: v["test_metrics"]["f1"], reverse=True)
    api.put(alias_path, {"version_id": better["id"], "reason": "best on test"})
    if worse["test_metrics"]["f1"] < better["test_metrics"]["f1"]:
        with pytest.raises(ApiError) as refused:
            api.put(alias_path, {"version_id": worse["id"]})
        assert refused.value.status == 409 and "worse" in refused.value.problem["detail"]
    moved = api.put(alias_path, {"version_id": worse["id"], "force": True, "reason": "test"})
    assert moved["version_id"] == worse["id"] and moved["history"][-1]["forced"] is True
    resolution = api.get("/api/v1/resolve", cell_line=CELL_LINE, channels=",".join(channels + ["nope"]))
    assert resolution["models"][channels[0]]["version_id"] == worse["id"]
    assert resolution["missing"] == ["nope"]

    # Channel-set selection ranks all 3 subsets and stores the best.
    selection = api.run("select-channels", {"dataset_id": ds["id"], "object": "nuclei", "split": "val"})
    ranking = selection["summary"]["ranking"]
    assert len(ranking) == 3 and ranking[0]["channels"] == selection["summary"]["chosen"]
    stored = api.get("/api/v1/channel-sets", cell_line=CELL_LINE)
    assert stored[0]["chosen"] == selection["summary"]["chosen"]

    # Segment a plate of two uploaded fields, with Flow Fusion and with STAPLE.
    plate = small_plate(2, seed=99)
    request = {
        "cell_line": CELL_LINE,
        "channels": channels,
        "use_channels": channels,
        "fields": [{"well": "B03", "field": 1}, {"well": "B03", "field": 2}],
    }
    for method in ("flow_fusion", "staple"):
        job = api.submit_segment(
            {**request, "method": method}, [(f"f{i}.tif", field_tiff(f)) for i, f in enumerate(plate)]
        )
        job = api.wait(job["id"], timeout=300)
        assert job["status"] == "succeeded", job
        assert job["summary"]["fields_done"] == 2 and job["summary"]["fields_failed"] == 0
        by_name = {r["name"]: r for r in job["results"]}
        for obj in ("nuclei", "cells"):
            labels = tiff_to_array(api.download(by_name[f"B03-1/{obj}.tif"]["url"]))
            assert labels.shape == plate[0].nuclei.shape and labels.dtype in (np.uint16, np.uint32)
            rois = zipfile.ZipFile(io.BytesIO(api.download(by_name[f"B03-1/{obj}_rois.zip"]["url"])))
            assert len(rois.namelist()) == len(np.unique(labels)) - 1
        rows = list(csv.DictReader(io.StringIO(api.download(by_name["B03-1/measurements.csv"]["url"]).decode())))
        assert {f"mean_{channels[0]}", "area", "centroid_y", "nucleus_label"} <= set(rows[0]) if rows else True
        overlay = Image.open(io.BytesIO(api.download(by_name["B03-1/overlay.png"]["url"])))
        assert overlay.size == (128, 128)
        provenance = json.loads(api.download(by_name["provenance.json"]["url"]))
        assert provenance["method"] == method and provenance["fused_channels"]["nuclei"] == channels
        assert provenance["models"]["nuclei"][channels[0]]["weights_sha256"] == worse["weights_sha256"]
        assert "cellpose" in provenance["library_versions"]
        # Where and how the networks ran (CELLFUSE_DEVICE=auto is the CPU on a machine without a GPU).
        assert provenance["compute"]["device"].startswith(("cpu", "cuda"))
        assert provenance["compute"]["precision"] in ("fp32", "bf16", "fp16")
        assert job["summary"]["precision"] == provenance["compute"]["precision"]

    # The same from local files, as `cellfuse segment` does: every result lands on disk under the job.
    local = settings.resolved_data_dir.parent / "local-fields"
    local.mkdir(exist_ok=True)
    (local / "B04-1.tif").write_bytes(field_tiff(plate[0]))
    job, written = segment_files(
        api, [local / "B04-1.tif"], {**request, "fields": [{"well": "B04", "field": 1}]}, local / "out"
    )
    assert {p.relative_to(local / "out" / job["id"]).as_posix() for p in written} == {r["name"] for r in job["results"]}
    assert np.array_equal(
        tiff_to_array((local / "out" / job["id"] / "B04-1" / "nuclei.tif").read_bytes()),
        tiff_to_array(api.download(next(r["url"] for r in job["results"] if r["name"] == "B04-1/nuclei.tif"))),
    )

    # Segmenting a dataset gives metrics against its masks; evaluations are stored.
    # (with per-image diameters from the size models)
    job = api.run(
        "segment-dataset",
        {"dataset_id": ds["id"], "split": "test", "use_channels": channels, "params": {"estimate_diameter": True}},
    )
    assert set(job["summary"]["metrics"]) == {"nuclei", "cells"}
    assert first["card"]["size_model"]["n_train"] == 4
    evaluation = api.run("evaluate", {"dataset_id": ds["id"], "split": "test", "model_version_id": first["id"]})
    assert 0.0 <= evaluation["summary"]["metrics"]["f1"] <= 1.0
    fused = api.run(
        "evaluate",
        {"dataset_id": ds["id"], "split": "test", "object": "nuclei", "use_channels": channels, "method": "voting"},
    )
    assert fused["summary"]["fusion"]["method"] == "voting"
    metrics_url = next(r["url"] for r in fused["results"] if r["name"] == "metrics.json")
    assert json.loads(api.download(metrics_url))["metrics"] == fused["summary"]["metrics"]


@pytest.mark.slow
def test_zoo_workflow_on_embedded_default(embedded_settings, worker_factory):
    run_workflow(embedded_settings, worker_factory)


@pytest.mark.slow
@pytest.mark.services
def test_zoo_workflow_on_postgresql_and_redis(services_settings, worker_factory):
    run_workflow(services_settings, worker_factory)
