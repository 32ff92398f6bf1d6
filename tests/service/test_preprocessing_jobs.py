"""Preprocessing recipes over HTTP with a real worker: a fine-tune estimates its dataset's
illumination profile and percentiles and records the recipe on the card; segmentation applies the
model's recipe to a new plate without the request naming it (a new profile, estimated on that
plate), falls back to the training profile on a plate too small to estimate one, and refuses
inputs it could not honour."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.client import ApiError, CellFuseClient
from app.science.image_files import image_to_tiff_bytes
from tests.service.conftest import make_client
from tests.service.test_base_segmentation import _shipped_base as shipped_base
from tests.service.workflow import CELL_LINE, register_tiny_base, small_plate, upload_dataset

TINY_TRAINING = {"max_epochs": 2, "min_epochs": 0, "patience": 5, "batch_size": 4, "bsize": 64}
RECIPE = {"illumination": "per-plate", "normalization": "per-plate"}


def vignette(shape: tuple[int, int], strength: float = 0.6) -> np.ndarray:
    """One microscope's shading, shared by every field: 1 at the centre, 1 - strength at the corners."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r2 = ((yy - shape[0] / 2) / shape[0]) ** 2 + ((xx - shape[1] / 2) / shape[1]) ** 2
    return 1.0 - strength * r2 / r2.max()


def shaded(fields, gain: float = 1.0):
    for f in fields:
        f.image = (100 + (f.image - 100) * vignette(f.image.shape[1:]) * gain).clip(0, 65535)
    return fields


def _tiff(field) -> bytes:
    return image_to_tiff_bytes(field.image.astype(np.uint16), field.channel_names)


def _provenance(api: CellFuseClient, job: dict) -> dict:
    url = next(r["url"] for r in job["results"] if r["name"] == "provenance.json")
    return json.loads(api.download(url))


@pytest.mark.slow
def test_a_recipe_follows_its_model_from_training_to_inference(embedded_settings, worker_factory):
    worker_factory(embedded_settings)
    client, _ = make_client(embedded_settings)
    api = CellFuseClient(client)
    base = register_tiny_base(api)
    fields = shaded(small_plate(8))
    channels = fields[0].channel_names
    ds = upload_dataset(api, fields, splits=["train", "train", "train", "train", "val", "test", "test", "val"])

    job = api.run(
        "finetune",
        {
            "dataset_id": ds["id"],
            "reporter": channels[0],
            "object": "nuclei",
            "base": base,
            "params": {**TINY_TRAINING, "preprocessing": RECIPE},
        },
        timeout=300,
    )
    assert job["status"] == "succeeded", job
    version = api.get(f"/api/v1/models/{job['summary']['model_version_id']}")
    recorded = version["card"]["data"]["preprocessing"]
    assert recorded["recipe"]["illumination"] == "per-plate" and recorded["recipe"]["normalization"] == "per-plate"
    low, high = recorded["percentiles"]
    assert high > low
    training_profile = api.get(f"/api/v1/illumination-profiles/{recorded['illumination_profile']['id']}")
    assert training_profile["source"] == "estimated" and training_profile["dataset_id"] == ds["id"]
    assert training_profile["channels"] == [channels[0]] and training_profile["inputs"]["fields"] == 8
    # The estimated flat-field follows the shading: darker corners than centre.
    flat_min, flat_max = (
        training_profile["summary"]["flatfield_min"][0],
        training_profile["summary"]["flatfield_max"][0],
    )
    assert flat_max / flat_min > 1.5
    preview = client.get(f"/api/v1/illumination-profiles/{training_profile['id']}/preview.png")
    assert preview.status_code == 200 and preview.content[:4] == b"\x89PNG"

    # A new, dimmer plate: the request names no preprocessing; the model's recipe is applied.
    plate = shaded(small_plate(6, seed=11), gain=0.5)
    request = {
        "cell_line": CELL_LINE,
        "channels": channels,
        "objects": ["nuclei"],
        "use_channels": [channels[0]],
        "fields": [{"well": "C01", "field": i} for i in range(6)],
    }
    job = api.wait(
        api.submit_segment(request, [(f"f{i}.tif", _tiff(f)) for i, f in enumerate(plate)])["id"], timeout=300
    )
    assert job["status"] == "succeeded", job
    used = _provenance(api, job)["preprocessing"]["nuclei"][channels[0]]
    assert used["recipe_source"] == "model card" and used["recipe"] == recorded["recipe"]
    assert used["illumination_profile"]["source"] == "estimated"
    assert used["illumination_profile"]["id"] != training_profile["id"]  # this plate's own profile
    assert used["percentiles"][1] < high  # the dimmer plate's own percentiles
    assert _provenance(api, job)["preprocessing_override"] is False

    # Two fields cannot carry a profile of their own: the model's training profile is used.
    small = {**request, "fields": request["fields"][:2]}
    job = api.wait(
        api.submit_segment(small, [(f"f{i}.tif", _tiff(f)) for i, f in enumerate(plate[:2])])["id"], timeout=300
    )
    assert job["status"] == "succeeded", job
    used = _provenance(api, job)["preprocessing"]["nuclei"][channels[0]]
    assert used["illumination_profile"]["id"] == training_profile["id"]
    assert used["illumination_profile"]["used_because"] == "plate too small to estimate"

    # An override is recorded as such.
    override = {**small, "params": {"preprocessing": {"normalization": "per-image"}}}
    job = api.wait(
        api.submit_segment(override, [(f"f{i}.tif", _tiff(f)) for i, f in enumerate(plate[:2])])["id"], timeout=300
    )
    provenance = _provenance(api, job)
    assert provenance["preprocessing_override"] is True
    assert provenance["preprocessing"]["nuclei"][channels[0]]["recipe_source"] == "request"
    assert provenance["preprocessing"]["nuclei"][channels[0]]["illumination_profile"] is None

    # What could not be honoured is refused before any job exists.
    too_small = {**small, "params": {"preprocessing": RECIPE}}
    with pytest.raises(ApiError) as refused:
        api.submit_segment(too_small, [(f"f{i}.tif", _tiff(f)) for i, f in enumerate(plate[:2])])
    assert refused.value.status == 422 and refused.value.problem["type"].endswith("plate-too-small-for-profile")

    wrong_size = client.post(
        "/api/v1/illumination-profiles",
        data={"name": "slide", "channels": channels[0]},
        files={"flatfield": ("flat.tif", image_to_tiff_bytes(np.ones((64, 64), np.float32)), "image/tiff")},
    )
    assert wrong_size.status_code == 201, wrong_size.text
    profile_request = {
        **small,
        "params": {"preprocessing": {"illumination": "profile", "profile_id": wrong_size.json()["id"]}},
    }
    with pytest.raises(ApiError) as refused:
        api.submit_segment(profile_request, [(f"f{i}.tif", _tiff(f)) for i, f in enumerate(plate[:2])])
    assert refused.value.status == 422 and refused.value.problem["type"].endswith("profile-shape-mismatch")

    mismatch = client.post(
        "/api/v1/illumination-profiles",
        data={"name": "slide", "channels": "a,b"},
        files={"flatfield": ("flat.tif", image_to_tiff_bytes(np.ones((64, 64), np.float32)), "image/tiff")},
    )
    assert mismatch.status_code == 422 and mismatch.json()["type"].endswith("profile-channel-mismatch")
    negative = client.post(
        "/api/v1/illumination-profiles",
        data={"name": "slide", "channels": "a"},
        files={"flatfield": ("flat.tif", image_to_tiff_bytes(-np.ones((64, 64), np.float32)), "image/tiff")},
    )
    assert negative.status_code == 422 and negative.json()["type"].endswith("invalid-profile")


@pytest.mark.slow
def test_evaluation_and_channel_selection_use_the_models_recipe(embedded_settings, worker_factory):
    """A model trained on corrected, plate-normalised pixels is scored on the same kind of pixels:
    an evaluation of its test split repeats the fine-tune's own test score (before, evaluate and
    select-channels fed it Cellpose's per-image scaling of the raw pixels)."""
    worker_factory(embedded_settings)
    client, _ = make_client(embedded_settings)
    api = CellFuseClient(client)
    fields = shaded(small_plate(8, seed=5), gain=0.4)
    channel = fields[0].channel_names[0]
    ds = upload_dataset(api, fields, splits=["train", "train", "train", "train", "val", "test", "test", "val"])
    # The shipped base: an untrained net would score 0 either way and prove nothing.
    base = shipped_base(api, embedded_settings)
    tuned = api.run(
        "finetune",
        {
            "dataset_id": ds["id"],
            "reporter": channel,
            "object": "nuclei",
            "base": base,
            "params": {**TINY_TRAINING, "preprocessing": RECIPE},
        },
        timeout=600,
    )
    assert tuned["status"] == "succeeded", tuned
    version = api.get(f"/api/v1/models/{tuned['summary']['model_version_id']}")
    recorded = version["card"]["data"]["preprocessing"]
    assert tuned["summary"]["test_metrics"]["f1"] > 0.1, tuned["summary"]["test_metrics"]

    evaluation = api.run(
        "evaluate", {"dataset_id": ds["id"], "split": "test", "model_version_id": version["id"]}, timeout=300
    )
    assert evaluation["status"] == "succeeded", evaluation
    used = evaluation["summary"]["preprocessing"][channel]
    assert used["recipe_source"] == "model card" and used["recipe"] == recorded["recipe"]
    assert used["illumination_profile"]["source"] == "estimated"
    assert used["percentiles"] == pytest.approx(recorded["percentiles"], rel=1e-3)
    assert evaluation["summary"]["metrics"]["f1"] == pytest.approx(tuned["summary"]["test_metrics"]["f1"], abs=1e-6)

    # Channel selection needs a model per channel: the other one keeps Cellpose's default recipe.
    other = fields[0].channel_names[1]
    job = {"dataset_id": ds["id"], "reporter": other, "object": "nuclei", "base": base, "params": TINY_TRAINING}
    assert api.run("finetune", job, timeout=600)["status"] == "succeeded"
    selection = api.run("select-channels", {"dataset_id": ds["id"], "object": "nuclei", "split": "val"}, timeout=300)
    assert selection["status"] == "succeeded", selection
    chosen = selection["summary"]["preprocessing"]
    assert chosen[channel]["recipe"] == recorded["recipe"] and chosen[channel]["recipe_source"] == "model card"
    assert chosen[other]["recipe"]["normalization"] == "per-image" and chosen[other]["percentiles"] is None

    # Segmenting the 2-image test split fits the recipe on the whole dataset too, as the fine-tune and
    # evaluate do (before: on the split alone, 2 images, too few for a profile: another scaling).
    segmented = api.run(
        "segment-dataset", {"dataset_id": ds["id"], "split": "test", "objects": ["nuclei"]}, timeout=300
    )
    assert segmented["status"] == "succeeded", segmented
    applied = _provenance(api, segmented)["preprocessing"]["nuclei"][channel]
    assert applied["recipe"] == recorded["recipe"] and applied["percentiles"] == pytest.approx(
        recorded["percentiles"], rel=1e-3
    )
    assert applied["illumination_profile"]["source"] == "estimated"
    assert "used_because" not in applied["illumination_profile"]


def _upload_flat(client, shape: tuple[int, ...], channels: str, darkfield_shape: tuple[int, ...] | None = None):
    files = {"flatfield": ("flat.tif", image_to_tiff_bytes(np.ones(shape, np.float32)), "image/tiff")}
    if darkfield_shape is not None:
        files["darkfield"] = ("dark.tif", image_to_tiff_bytes(np.zeros(darkfield_shape, np.float32)), "image/tiff")
    return client.post("/api/v1/illumination-profiles", data={"name": "slide", "channels": channels}, files=files)


def test_a_fine_tune_recipe_it_cannot_honour_is_refused_before_any_job(embedded_settings):
    """No worker: each refusal is a precise 422 at submission, and no job is created."""
    client, _ = make_client(embedded_settings)
    api = CellFuseClient(client)
    base = register_tiny_base(api)
    fields = small_plate(3, size=64)
    channel = fields[0].channel_names[0]
    ds = upload_dataset(api, fields, splits=["train", "val", "test"])

    def finetune(recipe: dict) -> ApiError:
        body = {"dataset_id": ds["id"], "reporter": channel, "object": "nuclei", "base": base}
        with pytest.raises(ApiError) as refused:
            api.submit("finetune", {**body, "params": {"preprocessing": recipe}})
        assert refused.value.status == 422
        return refused.value

    too_small = finetune(RECIPE)
    assert too_small.problem["type"].endswith("plate-too-small-for-profile")
    assert "3 image(s)" in too_small.problem["detail"]

    wrong = _upload_flat(client, (128, 128), channel)
    assert wrong.status_code == 201, wrong.text
    shape = finetune({"illumination": "profile", "profile_id": wrong.json()["id"]})
    assert shape.problem["type"].endswith("profile-shape-mismatch") and "128×128" in shape.problem["detail"]
    other = _upload_flat(client, (64, 64), "GFP")
    assert other.status_code == 201, other.text
    missing = finetune({"illumination": "profile", "profile_id": other.json()["id"]})
    assert missing.problem["type"].endswith("profile-channel-mismatch")
    unknown = finetune({"illumination": "profile", "profile_id": 999_999})
    assert unknown.problem["type"].endswith("unknown-profile")

    dark = _upload_flat(client, (64, 64), channel, darkfield_shape=(32, 32))
    assert dark.status_code == 422 and dark.json()["type"].endswith("invalid-profile"), dark.text
    assert "darkfield" in dark.json()["detail"]
    assert api.get("/api/v1/jobs")["total"] == 0
