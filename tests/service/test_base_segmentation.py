"""A base model segments and evaluates directly over HTTP (zero-shot), with a real worker: no
fine-tuned version and no registered reporter needed; a diameter given per field wins, the others
are estimated by the base's size model (one estimate per plate for uploaded plates, one per image
for datasets and evaluations), and every diameter used is recorded per field and in provenance."""

from __future__ import annotations

import json

import pytest

from app.client import CellFuseClient
from app.science.metrics import match
from tests.service.conftest import make_client
from tests.service.workflow import CELL_LINE, field_tiff, small_plate, tiff_to_array, upload_dataset


def _shipped_base(api: CellFuseClient, settings) -> str:
    """Register the shipped base as the service's start-up does (the test client skips start-up)."""
    from app.db import session_factory
    from app.storage import BlobStore
    from app.zoo import register_base_models

    with session_factory(settings.resolved_database_url)() as session:
        register_base_models(session, BlobStore(settings.blob_dir))
    shipped = [b for b in api.get("/api/v1/base-models") if b["source"] == "shipped"]
    assert shipped, "the shipped base is in models_zoo/"
    return shipped[-1]["name"]


@pytest.mark.slow
def test_base_model_segments_a_plate_with_per_field_and_estimated_diameters(embedded_settings, worker_factory):
    worker_factory(embedded_settings)
    client, _ = make_client(embedded_settings)
    api = CellFuseClient(client)
    base = _shipped_base(api, embedded_settings)
    api.ensure_cell_line(CELL_LINE, species="human")
    fields = small_plate(3, size=128, n_channels=2)
    channels = ["Hoechst-unregistered", "cyto-unregistered"]  # a base model needs no registered reporter
    request = {
        "cell_line": CELL_LINE,
        "channels": channels,
        "objects": ["nuclei"],
        "use_channels": [channels[1]],  # the synthetic plate's nuclear reporter
        "model": "base",
        "fields": [
            {"well": "A01", "field": 1, "diameter": 17.0},
            {"well": "A01", "field": 2},
            {"well": "A02", "field": 1},
        ],
    }
    tiffs = [(f"f{i}.tif", field_tiff(f)) for i, f in enumerate(fields)]
    job = api.wait(api.submit_segment(request, tiffs)["id"], timeout=600)
    assert job["status"] == "succeeded", job["error"]
    by_name = {d["field"]: d for d in job["summary"]["fields"]}
    given = by_name["A01-1"]["settings"]["nuclei"]
    assert given["diameter_source"] == "field" and given["diameter"] == 17.0
    estimated = [by_name[n]["settings"]["nuclei"] for n in ("A01-2", "A02-1")]
    for used in estimated:
        assert used["diameter_source"] == "plate estimate" and used["flow_threshold"] == 0.4
        assert 5.0 <= used["diameter"] <= 200.0
    assert estimated[0]["diameter"] == estimated[1]["diameter"]  # one estimate for the plate

    provenance = json.loads(api.download(next(r["url"] for r in job["results"] if r["name"] == "provenance.json")))
    assert provenance["models"]["nuclei"][channels[1]]["base_model"] == base
    plate_estimate = provenance["diameters"]["nuclei"]
    assert plate_estimate["mode"] == "per-plate" and plate_estimate["value"] == estimated[0]["diameter"]
    assert len(plate_estimate["diameter_estimate"]["fields"]) == 3  # first, middle and last field

    # The base found the synthetic nuclei at its own estimate (its card: F1 0.79 on synthetic fields).
    mask = tiff_to_array(api.download(next(r["url"] for r in job["results"] if r["name"] == "A01-2/nuclei.tif")))
    assert mask.shape == (128, 128) and match(fields[1].nuclei, mask).f1 > 0.5


@pytest.mark.slow
def test_base_model_evaluates_a_dataset_split_zero_shot(embedded_settings, worker_factory):
    worker_factory(embedded_settings)
    client, _ = make_client(embedded_settings)
    api = CellFuseClient(client)
    base = _shipped_base(api, embedded_settings)
    fields = small_plate(4, size=128, n_channels=2)
    ds = upload_dataset(api, fields, splits=["test"] * 4)
    nuclear = fields[0].channel_names[1]
    body = {"dataset_id": ds["id"], "split": "test", "object": "nuclei", "use_channels": [nuclear]}
    # Without a fine-tuned version the zoo has nothing: a clear 422 that names the way out.
    refused = client.post("/api/v1/jobs/evaluate", json=body)
    assert refused.status_code == 422 and refused.json()["type"].endswith("/missing-model")
    assert "base" in refused.json()["detail"]

    job = api.run("evaluate", {**body, "model": f"base:{base}"}, timeout=600)
    summary = job["summary"]
    assert summary["fusion"]["base_models"] and summary["fusion"]["models"] == {}
    assert [d["diameter_source"] for d in summary["fusion"]["diameters"]] == ["field estimate"] * 4
    # The shipped base on synthetic nuclei (its card: F1 0.79 on its synthetic split).
    assert summary["metrics"]["f1"] > 0.5, summary["metrics"]

    # A fixed diameter is used as given.
    job = api.run("evaluate", {**body, "model": "base", "params": {"diameter": 40.0}}, timeout=600)
    assert {d["diameter_source"] for d in job["summary"]["fusion"]["diameters"]} == {"request"}
    assert {d["diameter"] for d in job["summary"]["fusion"]["diameters"]} == {40.0}


def test_model_choices_are_checked_before_anything_is_stored(embedded_settings):
    client, _ = make_client(embedded_settings)
    api = CellFuseClient(client)
    _shipped_base(api, embedded_settings)
    api.ensure_cell_line(CELL_LINE, species="human")
    field = small_plate(1, size=64, n_channels=1)[0]
    files = [("files", ("f.tif", field_tiff(field), "image/tiff"))]

    def submit(**extra):
        request = {"cell_line": CELL_LINE, "channels": ["c0"], "objects": ["nuclei"], **extra}
        return client.post("/api/v1/jobs/segment", files=files, data={"request": json.dumps(request)})

    unknown = submit(model="base:no-such-base")
    assert unknown.status_code == 422 and unknown.json()["type"].endswith("/unknown-base-model")
    assert unknown.headers["content-type"].startswith("application/problem+json")
    wrong_channel = submit(model="base", models={"c9": "base"})
    assert wrong_channel.status_code == 422 and wrong_channel.json()["type"].endswith("/unknown-channel")
    malformed = submit(model="resnet")
    assert malformed.status_code == 422 and malformed.json()["type"].endswith("/validation-error")
    bad_diameter = submit(model="base", fields=[{"well": "A01", "field": 1, "diameter": -3}])
    assert bad_diameter.status_code == 422
    missing_version = submit(model="version:999999")
    assert missing_version.status_code == 404 and missing_version.json()["status"] == 404
    assert client.get("/api/v1/jobs").json()["total"] == 0  # nothing was accepted
