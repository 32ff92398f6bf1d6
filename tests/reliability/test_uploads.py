"""Uploads: byte and pixel limits, compressed TIFFs that declare huge images (refused from the
header, never decoded), whole-request limits, and file names that are never used as paths."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile

from app.science import image_files
from app.science.image_files import image_to_tiff_bytes, labels_to_tiff_bytes
from app.storage import check_result_name
from tests.reliability.conftest import make_client
from tests.service.conftest import make_embedded_settings

PROBLEM = "application/problem+json"


def _dataset(client) -> int:
    assert client.post("/api/v1/cell-lines", json={"name": "HeLa"}).status_code == 201
    assert client.post("/api/v1/reporters", json={"name": "GFP"}).status_code == 201
    response = client.post("/api/v1/datasets", json={"name": "d1", "cell_line": "HeLa", "channels": ["GFP"]})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def declared_huge_tiff(width: int, height: int) -> bytes:
    """A ~300-byte zlib TIFF whose header declares width x height pixels (a decompression bomb's
    header: decoding it would allocate width*height bytes)."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((16, 16), np.uint8), compression="zlib", metadata=None)
    data = bytearray(buffer.getvalue())
    page = tifffile.TiffFile(io.BytesIO(bytes(data))).pages[0]
    byteorder = "<" if data[:2] == b"II" else ">"
    for code, value in ((256, width), (257, height), (278, height)):
        tag = page.tags[code]
        assert tag.dtype == 4  # LONG: room for any size
        struct.pack_into(byteorder + "I", data, tag.valueoffset, value)
    return bytes(data)


def _blob_files(settings) -> list[Path]:
    return [p for p in settings.blob_dir.rglob("*") if p.is_file()]


def _upload(client, ds_id: int, image: bytes, filename: str = "field.tif", **files):
    parts = [("image", (filename, image, "image/tiff"))]
    parts += [(k, (f"{k}.tif", v, "image/tiff")) for k, v in files.items()]
    return client.post(f"/api/v1/datasets/{ds_id}/images", files=parts)


@pytest.mark.parametrize("size", [(60_000, 60_000), (9_000, 9_000), (1, 4_000_000_000)])
def test_compressed_tiff_declaring_a_huge_image_is_refused_without_decoding(embedded_settings, monkeypatch, size):
    client, _ = make_client(embedded_settings)
    ds = _dataset(client)
    decoded: list[object] = []
    real_decode = image_files._decode
    monkeypatch.setattr(image_files, "_decode", lambda series: decoded.append(series) or real_decode(series))
    bomb = declared_huge_tiff(*size)
    assert len(bomb) < 1000
    before = _blob_files(embedded_settings)
    response = _upload(client, ds, bomb)
    assert response.status_code in (413, 422), response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    assert "pixel" in response.json()["detail"] and "limit" in response.json()["detail"]
    assert decoded == []  # refused from the header alone
    assert _blob_files(embedded_settings) == before  # nothing stored
    # The same check guards masks.
    good = image_to_tiff_bytes(np.zeros((1, 16, 16), np.uint16))
    response = _upload(client, ds, good, nuclei=bomb)
    assert response.status_code in (413, 422) and "mask" in response.json()["detail"]
    assert len(decoded) == 1  # the valid image only; the mask was refused from its header


def test_pixel_limit_from_settings(tmp_path):
    settings = make_embedded_settings(tmp_path, max_image_pixels=64 * 64)
    client, _ = make_client(settings)
    ds = _dataset(client)
    assert _upload(client, ds, image_to_tiff_bytes(np.ones((1, 64, 64), np.uint16))).status_code == 201
    response = _upload(client, ds, image_to_tiff_bytes(np.ones((1, 64, 65), np.uint16)))
    assert response.status_code == 422 and "4,160 pixel values" in response.json()["detail"]


def test_byte_limit_per_file(tmp_path):
    settings = make_embedded_settings(tmp_path, max_upload_bytes=4000)
    client, _ = make_client(settings)
    ds = _dataset(client)
    noisy = np.random.default_rng(0).integers(0, 65535, (1, 64, 64), dtype=np.uint16)
    big = image_to_tiff_bytes(noisy)
    assert len(big) > 4000
    response = _upload(client, ds, big)
    assert response.status_code == 413, response.text
    body = response.json()
    assert body["type"].endswith("upload-too-large") and body["limit_bytes"] == 4000
    assert _blob_files(settings) == []
    assert _upload(client, ds, image_to_tiff_bytes(np.ones((1, 16, 16), np.uint16))).status_code == 201


def test_request_body_limit_refuses_before_reading(tmp_path):
    settings = make_embedded_settings(tmp_path, max_request_bytes=10_000)
    client, _ = make_client(settings)
    ds = _dataset(client)
    payload = b"\0" * 50_000
    # A declared Content-Length over the limit.
    response = _upload(client, ds, payload)
    assert response.status_code == 413 and response.json()["type"].endswith("request-too-large")
    # A chunked body without a length: cut off once it passes the limit.
    sent: list[int] = []

    def chunks():
        for _ in range(50):
            sent.append(1)
            yield b"x" * 1000

    response = client.post(
        f"/api/v1/datasets/{ds}/images", content=chunks(), headers={"content-type": "multipart/form-data; boundary=abc"}
    )
    assert response.status_code == 413 and response.json()["limit_bytes"] == 10_000
    assert _blob_files(settings) == []
    # Small requests still pass.
    assert client.post("/api/v1/jobs/noop", json={"steps": 1}).status_code == 202


def test_file_names_are_never_paths(embedded_settings):
    client, _ = make_client(embedded_settings)
    ds = _dataset(client)
    image = image_to_tiff_bytes(np.arange(256, dtype=np.uint16).reshape(1, 16, 16))
    mask = labels_to_tiff_bytes(np.ones((16, 16), np.int32))
    data_dir = embedded_settings.resolved_data_dir
    before = {p for p in data_dir.parent.rglob("*")}
    for evil in (
        "../../etc/passwd",
        "..\\..\\windows\\system32\\x.tif",
        "/etc/shadow",
        "a/../../../b.tif",
        "<script>alert(1)</script>.tif",
        "x\r\nSet-Cookie: a=b.tif",
        "\x00.tif",
    ):
        response = _upload(client, ds, image, filename=evil, nuclei=mask)
        assert response.status_code == 201, (evil, response.text)
        row = response.json()
        # Stored content-addressed, under the blob folder, by the hash of the bytes.
        blob = embedded_settings.blob_dir / row["image_sha256"][:2] / row["image_sha256"][2:4] / row["image_sha256"]
        assert blob.read_bytes() == image
        shown = row["filename"]
        assert "/" not in shown and "\\" not in shown and ".." not in shown.replace("...", "")
        assert not any(ch in shown for ch in "<>\r\n\x00")
    assert client.get(f"/api/v1/datasets/{ds}").json()["images"][0]["filename"] == "passwd"
    created = {p for p in data_dir.parent.rglob("*")} - before
    assert all(data_dir in p.parents for p in created), created
    assert not Path("/etc/passwd.tif").exists()


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/../../b",
        "/etc/passwd",
        "a/b/c",
        "",
        "a\\b",
        "..",
        ".",
        "x" * 101,
        "a//b",
        "é.csv",
        "a\x00b",
        "a.csv\n",
        "a/.",
        "./a",
    ],
)
def test_result_names_cannot_escape_the_job_folder(name):
    with pytest.raises(ValueError):
        check_result_name(name)
    assert check_result_name("B03-1/nuclei.tif") == "B03-1/nuclei.tif"


def test_result_download_refuses_traversal(embedded_settings):
    client, _ = make_client(embedded_settings)
    job = client.post("/api/v1/jobs/noop", json={"steps": 1}).json()
    (embedded_settings.resolved_data_dir / "secret.txt").write_text("secret")
    for name in ("..%2F..%2Fsecret.txt", "%2E%2E/%2E%2E/secret.txt", "..%5C..%5Csecret.txt", "x/../../../secret.txt"):
        response = client.get(f"/api/v1/jobs/{job['id']}/results/{name}")
        assert response.status_code == 404 and "secret" not in response.text.replace("secret.txt", "")
