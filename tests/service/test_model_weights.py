"""Model weights download: safetensors + card (zip), the card alone, Cellpose's own format."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile

from app.db import session_factory
from app.models import CellLine, ModelVersion, Reporter
from app.storage import BlobStore
from tests.service.conftest import make_client
from tests.service.workflow import TINY_WIDTHS, tiny_base_weights


def _seed_version(settings, *, widths=TINY_WIDTHS, cellpose_bytes: bytes | None = None) -> tuple[int, bytes]:
    blobs = BlobStore(settings.blob_dir)
    data = tiny_base_weights()
    sha = blobs.put_bytes(data).sha256
    extra = {}
    if cellpose_bytes is not None:
        extra["cellpose_weights_sha256"] = blobs.put_bytes(cellpose_bytes).sha256
    card = {
        "name": "U2OS-GFP-nuclei",
        "version": "1",
        "weights_sha256": sha,
        "extra": extra,
        "architecture": {"type": "cellpose-cpnet", "widths": list(widths), "nchan": 2, "nout": 3},
    }
    with session_factory(settings.resolved_database_url)() as session:
        line, reporter = CellLine(name="U2OS"), Reporter(name="GFP")
        session.add_all([line, reporter])
        session.flush()
        row = ModelVersion(
            cell_line_id=line.id,
            reporter_id=reporter.id,
            object="nuclei",
            version=1,
            status="ready",
            weights_sha256=sha,
            card=card,
            diameter=17.0,
        )
        session.add(row)
        session.commit()
        return row.id, data


def test_zip_holds_safetensors_and_card_that_load(embedded_settings):
    version_id, data = _seed_version(embedded_settings)
    client, _ = make_client(embedded_settings, role="scientist")
    response = client.get(f"/api/v1/models/{version_id}/weights")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    names = set(archive.namelist())
    stem = "U2OS-GFP-nuclei-v1"
    assert {f"{stem}.safetensors", f"{stem}.json", "README.txt"} <= names
    weights = archive.read(f"{stem}.safetensors")
    card = json.loads(archive.read(f"{stem}.json"))
    assert weights == data and card["weights_sha256"] == hashlib.sha256(weights).hexdigest()

    # The downloaded pair loads with the exact loader (sha256 and keys checked).
    import tempfile
    from pathlib import Path

    from app.science.weights import load_model

    with tempfile.TemporaryDirectory() as folder:
        archive.extractall(folder)
        _net, loaded_card = load_model(Path(folder) / f"{stem}.safetensors")
    assert loaded_card.widths == TINY_WIDTHS

    raw = client.get(f"/api/v1/models/{version_id}/weights", params={"format": "safetensors"})
    assert raw.content == data and raw.headers["x-content-sha256"] == card["weights_sha256"]
    assert client.get(f"/api/v1/models/{version_id}/weights", params={"format": "card"}).json() == card


def test_cellpose_format_refused_for_reduced_width_and_served_for_full_width(embedded_settings):
    version_id, _ = _seed_version(embedded_settings)
    client, _ = make_client(embedded_settings, role="scientist")
    response = client.get(f"/api/v1/models/{version_id}/weights", params={"format": "cellpose"})
    assert response.status_code == 409
    assert response.json()["type"].endswith("not-cellpose-compatible")
    assert "full-width" in response.json()["detail"]


def test_cellpose_export_served_when_stored(tmp_path):
    from tests.service.conftest import make_embedded_settings

    settings = make_embedded_settings(tmp_path)
    version_id, _ = _seed_version(settings, widths=(32, 64, 128, 256), cellpose_bytes=b"cellpose-state-dict")
    client, _ = make_client(settings, role="scientist")
    response = client.get(f"/api/v1/models/{version_id}/weights", params={"format": "cellpose"})
    assert response.status_code == 200 and response.content == b"cellpose-state-dict"


def test_weights_need_scientist_role_and_known_version(embedded_settings):
    version_id, _ = _seed_version(embedded_settings)
    client, _ = make_client(embedded_settings, role="instrument")
    assert client.get(f"/api/v1/models/{version_id}/weights").status_code == 403
    admin, _ = make_client(embedded_settings, role="admin")
    assert admin.get("/api/v1/models/999/weights").status_code == 404
