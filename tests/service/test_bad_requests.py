"""Bad requests get precise 4xx problem details and leave nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.client import CellFuseClient
from app.science.image_files import image_to_tiff_bytes, labels_to_tiff_bytes
from tests.service.conftest import make_client, make_embedded_settings
from tests.service.workflow import CELL_LINE, field_tiff, small_plate, upload_dataset

PROBLEM = "application/problem+json"


def _blob_files(settings) -> set[str]:
    root = settings.blob_dir
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} if root.exists() else set()


@pytest.fixture
def setup(tmp_path):
    settings = make_embedded_settings(tmp_path, max_upload_bytes=400_000)
    client, _ = make_client(settings)
    api = CellFuseClient(client)
    fields = small_plate(3, size=96)
    ds = upload_dataset(api, fields, splits=["train", "val", "test"])
    return settings, client, api, fields, ds


def _assert_problem(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status and body["detail"]
    for word in words:
        assert word in body["detail"], (word, body["detail"])
    return body


def _segment(client, request: dict, files: list[tuple[str, bytes]]):
    return client.post(
        "/api/v1/jobs/segment",
        data={"request": json.dumps(request)},
        files=[("files", (n, d, "image/tiff")) for n, d in files],
    )


def _nothing_written(settings, client, blobs_before: set[str], jobs_before: int) -> None:
    assert _blob_files(settings) == blobs_before
    assert client.get("/api/v1/jobs").json()["total"] == jobs_before


def test_unknown_cell_line_is_404(setup):
    settings, client, api, fields, _ = setup
    blobs, jobs = _blob_files(settings), client.get("/api/v1/jobs").json()["total"]
    response = _segment(
        client, {"cell_line": "NoSuchLine", "channels": fields[0].channel_names}, [("f.tif", field_tiff(fields[0]))]
    )
    _assert_problem(response, 404, "NoSuchLine")
    _nothing_written(settings, client, blobs, jobs)


def test_channel_count_not_matching_the_map_is_422(setup):
    settings, client, api, fields, ds = setup
    blobs, jobs = _blob_files(settings), client.get("/api/v1/jobs").json()["total"]
    one_channel = image_to_tiff_bytes(fields[0].image[:1].astype(np.uint16))
    response = client.post(
        f"/api/v1/datasets/{ds['id']}/images", files=[("image", ("one.tif", one_channel, "image/tiff"))]
    )
    _assert_problem(response, 422, "1 channel", "maps 2")
    assert len(client.get(f"/api/v1/datasets/{ds['id']}").json()["images"]) == 3
    _nothing_written(settings, client, blobs, jobs)


def test_corrupt_tiff_is_422_naming_the_file(setup):
    settings, client, api, fields, ds = setup
    blobs, jobs = _blob_files(settings), client.get("/api/v1/jobs").json()["total"]
    corrupt = field_tiff(fields[0])[:300]
    response = client.post(
        f"/api/v1/datasets/{ds['id']}/images", files=[("image", ("broken.tif", corrupt, "image/tiff"))]
    )
    body = _assert_problem(response, 422, "broken.tif")
    assert body["type"].endswith("invalid-image")
    _nothing_written(settings, client, blobs, jobs)


def test_mask_of_the_wrong_size_is_refused_and_the_image_not_stored(setup):
    settings, client, api, fields, ds = setup
    blobs, jobs = _blob_files(settings), client.get("/api/v1/jobs").json()["total"]
    new_image = image_to_tiff_bytes((fields[0].image + 1).astype(np.uint16))
    response = client.post(
        f"/api/v1/datasets/{ds['id']}/images",
        files=[
            ("image", ("new.tif", new_image, "image/tiff")),
            ("nuclei", ("m.tif", labels_to_tiff_bytes(np.zeros((10, 10), np.int32)), "image/tiff")),
        ],
    )
    _assert_problem(response, 422, "mask")
    _nothing_written(settings, client, blobs, jobs)


def test_oversized_upload_is_413(setup):
    settings, client, api, fields, ds = setup
    blobs, jobs = _blob_files(settings), client.get("/api/v1/jobs").json()["total"]
    big = np.random.default_rng(0).integers(0, 65535, size=(2, 400, 400), dtype=np.uint16)
    response = client.post(
        f"/api/v1/datasets/{ds['id']}/images", files=[("image", ("big.tif", image_to_tiff_bytes(big), "image/tiff"))]
    )
    _assert_problem(response, 413)
    _nothing_written(settings, client, blobs, jobs)


def test_missing_model_for_a_requested_channel_is_422(setup):
    settings, client, api, fields, _ = setup
    blobs, jobs = _blob_files(settings), client.get("/api/v1/jobs").json()["total"]
    channels = fields[0].channel_names
    response = _segment(
        client,
        {"cell_line": CELL_LINE, "channels": channels, "objects": ["nuclei"]},
        [("f.tif", field_tiff(fields[0]))],
    )
    body = _assert_problem(response, 422, "no nuclei model", channels[0])
    assert body["missing"] == channels
    _nothing_written(settings, client, blobs, jobs)


def test_unknown_channel_in_use_channels_is_422(setup):
    settings, client, api, fields, _ = setup
    response = _segment(
        client,
        {"cell_line": CELL_LINE, "channels": fields[0].channel_names, "use_channels": ["GFP-nope"]},
        [("f.tif", field_tiff(fields[0]))],
    )
    _assert_problem(response, 422, "GFP-nope")


def test_malformed_segment_request_json_is_422(setup):
    settings, client, api, fields, _ = setup
    response = client.post(
        "/api/v1/jobs/segment",
        data={"request": "{not json"},
        files=[("files", ("f.tif", field_tiff(fields[0]), "image/tiff"))],
    )
    _assert_problem(response, 422)


def test_finetune_on_unknown_reporter_and_unknown_base(setup):
    settings, client, api, fields, ds = setup
    response = client.post(
        "/api/v1/jobs/finetune", json={"dataset_id": ds["id"], "reporter": "nope", "object": "nuclei"}
    )
    _assert_problem(response, 422, "nope")
    response = client.post(
        "/api/v1/jobs/finetune",
        json={"dataset_id": ds["id"], "object": "nuclei", "reporter": fields[0].channel_names[0], "base": "ghost"},
    )
    _assert_problem(response, 404, "ghost")
    response = client.post("/api/v1/jobs/finetune", json={"dataset_id": 999, "object": "nuclei", "reporter": "x"})
    _assert_problem(response, 404, "999")
    assert client.get("/api/v1/jobs").json()["total"] == 0


def test_duplicate_names_are_409(setup):
    settings, client, api, fields, _ = setup
    response = client.post("/api/v1/cell-lines", json={"name": CELL_LINE})
    _assert_problem(response, 409, CELL_LINE)
