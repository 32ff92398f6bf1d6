"""The routes the web page's result viewer, plate map and "download all" use, on a finished
segmentation job written straight into the embedded store (no worker needed): layers are the field's
size, a click finds the right objects and rows, failed fields are marked, the zip holds every result."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from app.db import session_factory
from app.models import Job, JobResult
from app.science import exports
from app.science.image_files import image_to_tiff_bytes, labels_to_tiff_bytes
from app.security import create_key
from app.storage import BlobStore, JobFolder
from tests.service.conftest import make_client


def _finished_plate(settings) -> str:
    """A 2-well segmentation: A01-1 done (one nucleus inside one cell), B02-1 failed."""
    image = np.zeros((2, 40, 60), np.uint16)
    image[0, 10:20, 10:20] = 1000
    image[1, 5:30, 5:30] = 300
    nuclei = np.zeros((40, 60), np.int32)
    nuclei[10:20, 10:20] = 1
    cells = np.zeros((40, 60), np.int32)
    cells[5:30, 5:30] = 7
    sha = BlobStore(settings.blob_dir).put_bytes(image_to_tiff_bytes(image, ["GFP", "RFP"])).sha256
    rows = exports.measure_cells(nuclei, cells, image, ["GFP", "RFP"])
    files = {
        "A01-1/nuclei.tif": ("nuclei_mask", labels_to_tiff_bytes(nuclei)),
        "A01-1/cells.tif": ("cells_mask", labels_to_tiff_bytes(cells)),
        "A01-1/measurements.csv": (
            "measurements",
            exports.measurements_csv(rows, columns=exports.measurement_columns(["GFP", "RFP"])),
        ),
        "provenance.json": ("provenance", b"{}"),
    }
    with session_factory(settings.resolved_database_url)() as session:
        job = Job(
            kind="segment",
            status="succeeded",
            stage="done",
            progress=1.0,
            params={
                "cell_line": "L",
                "channels": ["GFP", "RFP"],
                "plate": "P1",
                "fields": [
                    {"name": "A01-1", "well": "A01", "field": 1, "image_sha256": sha},
                    {"name": "B02-1", "well": "B02", "field": 1, "image_sha256": sha},
                ],
            },
            summary={
                "fields": [{"field": "A01-1", "well": "A01", "objects": {"nuclei": 1, "cells": 1}}],
                "failed_fields": [{"field": "B02-1", "error": "damaged TIFF"}],
            },
        )
        session.add(job)
        session.flush()
        folder = JobFolder(settings.jobs_dir, job.id)
        for name, (kind, data) in files.items():
            _path, digest = folder.write_bytes(name, data)
            session.add(
                JobResult(
                    job_id=job.id,
                    name=name,
                    kind=kind,
                    media_type="application/octet-stream",
                    sha256=digest,
                    size_bytes=len(data),
                    meta={"field": "A01-1"},
                )
            )
        session.commit()
        return job.id


@pytest.fixture
def plate(embedded_settings):
    client, _key = make_client(embedded_settings, run_reaper=False)
    with client:
        yield client, _finished_plate(embedded_settings), embedded_settings


def _png(response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def test_viewer_layers_are_the_full_field(plate):
    client, job_id, _ = plate
    info = client.get(f"/api/v1/jobs/{job_id}/view/A01-1").json()
    assert (info["width"], info["height"]) == (60, 40)
    assert [c["name"] for c in info["channels"]] == ["GFP", "RFP"]
    assert info["objects"] == {"nuclei": {"count": 1, "colour": "ffff00"}, "cells": {"count": 1, "colour": "ff00ff"}}
    green = _png(client.get(f"/api/v1/jobs/{job_id}/view/A01-1/channel/0.png?low=0&high=1000&tint=00ff00"))
    assert green.size == (60, 40) and green.mode == "RGB"
    pixels = np.asarray(green)
    assert tuple(pixels[15, 15]) == (0, 255, 0) and tuple(pixels[0, 0]) == (0, 0, 0)
    outlines = _png(client.get(f"/api/v1/jobs/{job_id}/view/A01-1/outlines/nuclei.png"))
    alpha = np.asarray(outlines)[..., 3]
    assert outlines.mode == "RGBA" and alpha[10, 10] == 255 and alpha[15, 15] == 0 and alpha[0, 0] == 0
    assert client.get(f"/api/v1/jobs/{job_id}/view/A01-1/channel/2.png").status_code == 404
    assert client.get(f"/api/v1/jobs/{job_id}/view/A01-1/channel/0.png?low=5&high=5").status_code == 422
    assert client.get(f"/api/v1/jobs/{job_id}/view/Z99-1").status_code == 404
    assert client.get(f"/api/v1/jobs/{job_id}/view/A01-1/outlines/mito.png").status_code == 404


def test_a_click_finds_the_objects_and_their_rows(plate):
    client, job_id, _ = plate
    inside = client.get(f"/api/v1/jobs/{job_id}/view/A01-1/pick?x=12&y=14").json()
    assert (inside["nucleus_label"], inside["cell_label"]) == (1, 7)
    assert sorted((r["object"], r["label"]) for r in inside["rows"]) == [("cell", "7"), ("nucleus", "1")]
    cytoplasm = client.get(f"/api/v1/jobs/{job_id}/view/A01-1/pick?x=25&y=25").json()
    assert (cytoplasm["nucleus_label"], cytoplasm["cell_label"]) == (0, 7)
    assert [r["object"] for r in cytoplasm["rows"]] == ["cell"]
    background = client.get(f"/api/v1/jobs/{job_id}/view/A01-1/pick?x=50&y=35").json()
    assert background["rows"] == [] and background["cell_label"] == 0


def test_the_plate_marks_failed_fields(plate):
    client, job_id, _ = plate
    body = client.get(f"/api/v1/jobs/{job_id}/plate").json()
    wells = {w["well"]: w for w in body["wells"]}
    assert wells["A01"]["counts"] == {"nuclei": 1, "cells": 1} and wells["A01"]["failed"] == []
    assert wells["B02"]["failed"] == [{"field": "B02-1", "error": "damaged TIFF"}]
    assert wells["A01"]["medians"]["nucleus:area"] == 100.0 and "cell:mean_GFP" in body["measures"]


def test_download_all_is_one_zip_of_every_result(plate):
    client, job_id, settings = plate
    response = client.get(f"/api/v1/jobs/{job_id}/results.zip")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    assert "attachment" in response.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == sorted(
            ["A01-1/nuclei.tif", "A01-1/cells.tif", "A01-1/measurements.csv", "provenance.json"]
        )
        folder = JobFolder(settings.jobs_dir, job_id)
        assert archive.read("A01-1/measurements.csv") == folder.file("A01-1/measurements.csv").read_bytes()


def test_another_instrument_sees_none_of_it_and_keys_know_their_role(plate):
    client, job_id, settings = plate
    with session_factory(settings.resolved_database_url)() as session:
        _row, other = create_key(session, "other-instrument", "instrument")
    headers = {"X-API-Key": other}
    for path in ("results.zip", "plate", "view/A01-1", "view/A01-1/pick?x=1&y=1"):
        assert client.get(f"/api/v1/jobs/{job_id}/{path}", headers=headers).status_code == 404, path
    me = client.get("/api/v1/keys/me", headers=headers).json()
    assert me["role"] == "instrument" and me["name"] == "other-instrument"
    assert client.get("/api/v1/keys/me", headers={"X-API-Key": "nope"}).status_code == 401
