"""OME-Zarr HCS plates over HTTP with a real worker: a plate written here with ome-zarr is segmented,
its labels and well tables are read back with ome-zarr, and plate QC flags a planted empty field and
a drifted reporter. Bad plates are refused with the well, the field and the reason."""

from __future__ import annotations

import csv
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import zarr

from app.client import CellFuseClient
from app.science import ome_zarr_io
from tests.service.conftest import make_client, make_embedded_settings
from tests.service.test_webhooks import Receiver
from tests.service.workflow import CELL_LINE, small_plate, upload_dataset

TRAINING = {"max_epochs": 2, "min_epochs": 0, "patience": 5, "batch_size": 4, "bsize": 64}
SPLITS = ["train", "train", "train", "train", "val", "test", "test", "val"]


def _omero(names):
    return {
        "channels": [
            {"label": n, "color": "FFFFFF", "active": True, "window": {"start": 0, "end": 4000, "min": 0, "max": 65535}}
            for n in names
        ]
    }


def write_plate(
    root: Path, images: dict[str, list[np.ndarray]], channel_names: list[str], *, v04: bool = True, z: int = 1
) -> Path:
    """An HCS plate with ome-zarr: wells 'A/1', 'A/2', ... each with its fields (C, Y, X)."""
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    kw = {"fmt": FormatV04()} if v04 else {}
    group = zarr.open_group(str(root), mode="w", zarr_format=2 if v04 else 3)
    wells = sorted(images)
    rows = sorted({w.split("/")[0] for w in wells})
    cols = sorted({w.split("/")[1] for w in wells})
    write_plate_metadata(group, rows, cols, wells, name="P-7", **kw)
    for well in wells:
        well_group = group.require_group(well)
        write_well_metadata(well_group, [str(i) for i in range(len(images[well]))], **kw)
        for i, image in enumerate(images[well]):
            data, axes = image.astype(np.uint16), "cyx"
            if z > 1:
                data, axes = np.stack([data] * z, axis=1), "czyx"
            write_image(
                data, well_group.require_group(str(i)), axes=axes, scale_factors=(2,), omero=_omero(channel_names), **kw
            )
    return root


def _request(**fields) -> dict:
    return {"request": json.dumps({"cell_line": CELL_LINE, "objects": ["nuclei"], **fields})}


def _segment(client, api, data, files=None) -> dict:
    response = client.post("/api/v1/jobs/segment-ome-zarr", data=data, files=files)
    assert response.status_code == 202, response.text
    return api.wait(response.json()["id"], timeout=600)


def test_bad_plates_are_refused_with_well_field_and_reason(tmp_path):
    roots = tmp_path / "plates"
    roots.mkdir()
    settings = make_embedded_settings(tmp_path, ome_zarr_roots=[roots])
    client, _ = make_client(settings, run_reaper=False)
    api = CellFuseClient(client)
    api.ensure_cell_line(CELL_LINE)
    fields = small_plate(n_fields=2, size=64)
    names = fields[0].channel_names
    stack = write_plate(roots / "z.ome.zarr", {"A/1": [fields[0].image, fields[1].image]}, names, z=3)

    r = client.post("/api/v1/jobs/segment-ome-zarr", data=_request(path=str(stack)))
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["type"].endswith("invalid-ome-zarr") and body["well"] == "A01" and body["field"] == "0"
    assert "z=3" in body["detail"]

    outside = write_plate(tmp_path / "elsewhere.ome.zarr", {"A/1": [fields[0].image]}, names)
    r = client.post("/api/v1/jobs/segment-ome-zarr", data=_request(path=str(outside)))
    assert r.status_code == 422 and r.json()["type"].endswith("ome-zarr-path-not-allowed")
    r = client.post("/api/v1/jobs/segment-ome-zarr", data=_request(path=str(roots / ".." / "elsewhere.ome.zarr")))
    assert r.status_code == 422 and r.json()["type"].endswith("ome-zarr-path-not-allowed")

    # A well whose fields disagree on channels is named.
    good = write_plate(roots / "c.ome.zarr", {"A/1": [fields[0].image], "A/2": [fields[1].image]}, names)
    attrs = zarr.open_group(str(good / "A" / "2" / "0"), mode="r+")
    omero = dict(attrs.attrs)["omero"]
    omero["channels"][0]["label"] = "somethingelse"
    attrs.attrs["omero"] = omero
    r = client.post("/api/v1/jobs/segment-ome-zarr", data=_request(path=str(good)))
    assert r.status_code == 422 and r.json()["well"] == "A02" and "differ" in r.json()["detail"]

    # Unregistered reporters are refused, not guessed; a zip with a path outside the plate too.
    ok = write_plate(roots / "ok.ome.zarr", {"A/1": [fields[0].image]}, names)
    r = client.post("/api/v1/jobs/segment-ome-zarr", data=_request(path=str(ok)))
    assert r.status_code == 422 and r.json()["type"].endswith("unknown-channel")
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../../escape.txt", "x")
    r = client.post(
        "/api/v1/jobs/segment-ome-zarr",
        data=_request(),
        files={"plate": ("plate.zip", evil.getvalue(), "application/zip")},
    )
    assert r.status_code == 422 and "outside" in r.json()["detail"]
    assert not (settings.resolved_data_dir / "blobs").exists() or not any(
        p.is_file() for p in (settings.resolved_data_dir / "blobs").rglob("*") if "tmp" not in p.parts
    )


@pytest.mark.slow
def test_plate_segmented_labels_tables_and_qc(tmp_path, worker_factory):
    roots = tmp_path / "plates"
    roots.mkdir()
    # Fields of 128² are over this limit: every field goes through blocked segmentation (64-pixel
    # cores with their halos), which the pipeline uses for stitched wells.
    settings = make_embedded_settings(
        tmp_path, ome_zarr_roots=[roots], segment_block_pixels=100 * 100, webhook_allow_private=True, webhook_poll_s=0.2
    )
    worker_factory(settings)
    client, _ = make_client(settings)
    api = CellFuseClient(client)
    receiver = Receiver()
    receiver.secret = client.post(
        "/api/v1/webhooks", json={"url": receiver.url, "events": ["plate.qc_flagged"], "plate": "P-7"}
    ).json()["secret"]
    with client:  # the lifespan registers the shipped base model (and sends webhooks)
        fields = small_plate()
        names = fields[0].channel_names
        ds = upload_dataset(api, fields, splits=SPLITS)
        for reporter in names:
            job = api.run(
                "finetune",
                {
                    "dataset_id": ds["id"],
                    "reporter": reporter,
                    "object": "nuclei",
                    "base": "cellfuse-base-w16:v3",
                    "params": TRAINING,
                },
                timeout=600,
            )
            version = api.get(f"/api/v1/models/{job['summary']['model_version_id']}")
            assert version["card"]["extra"]["style_reference"]["n"] >= 4
            api.put(f"/api/v1/aliases/{CELL_LINE}/{reporter}/nuclei/production", {"version_id": version["id"]})

        rng = np.random.default_rng(5)
        empty = np.stack([rng.normal(200, 5, fields[0].image.shape[1:]) for _ in names]).clip(0)
        drifted = fields[3].image.copy()
        drifted[1] = drifted[1].max() - drifted[1] + rng.normal(0, 400, drifted[1].shape)  # inverted, noisy
        plate_images = {
            "A/1": [fields[0].image, fields[1].image, empty],
            "A/2": [fields[2].image, drifted, fields[5].image],
        }
        plate = write_plate(roots / "p7.ome.zarr", plate_images, names)

        job = _segment(client, api, _request(path=str(plate)))
        assert job["status"] == "succeeded", job
        summary = job["summary"]
        assert summary["fields_done"] == 6 and summary["ome_zarr"]["version"] == "0.4"

        # Labels next to each image, read back with ome-zarr, with their provenance.
        for well, n in (("A/1", 3), ("A/2", 3)):
            for i in range(n):
                labels, meta = ome_zarr_io.read_labels(plate, f"{well}/{i}", "nuclei")
                assert labels.shape == fields[0].image.shape[1:]
                cellfuse = meta["source"]["cellfuse"]
                assert meta["source"]["image"] == "../../" and cellfuse["method"] == "flow_fusion"
                assert set(cellfuse["channels"]) == set(names)
                assert all(len(m["weights_sha256"]) == 64 for m in cellfuse["models"].values())
                assert "flow_threshold" in cellfuse["thresholds"] and cellfuse["diameter"]
        first, _ = ome_zarr_io.read_labels(plate, "A/1/0", "nuclei")
        assert first.max() > 3
        # (The empty field's noise, stretched by per-image normalisation, gives a few junk objects:
        # exactly what QC is for.)
        assert zarr.open_group(str(plate / "A/1/0/labels"), mode="r").attrs["labels"] == ["nuclei"]

        # A measurements table per well, inside the plate, with the field of each object.
        with (plate / "A/1/tables/measurements.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        counts = [int(ome_zarr_io.read_labels(plate, f"A/1/{i}", "nuclei")[0].max()) for i in range(3)]
        assert {"0", "1"} <= {r["field"] for r in rows} and len(rows) == sum(counts)
        assert {int(r["label"]) for r in rows if r["field"] == "0"} == set(range(1, counts[0] + 1))

        # QC: the empty field and the drifted reporter are flagged, in results, provenance and summary.
        qc = summary["qc"]
        assert "A01-2" in qc["flagged_fields"], (qc, summary["qc_field_stats"])
        assert f"nuclei:{names[1]}" in qc["drifted_channels"], qc
        provenance = json.loads(client.get(f"/api/v1/jobs/{job['id']}/results/provenance.json").content)
        assert provenance["qc"]["flagged_fields"] == qc["flagged_fields"]
        flags = json.loads(client.get(f"/api/v1/jobs/{job['id']}/results/qc.json").content)["flags"]
        drift = [f for f in flags if f["type"] == "style_drift"]
        # The inverted reporter is flagged; real fields are not (the noise-only field may be: it is unlike
        # any training image too).
        assert "A02-1" in {f["field"] for f in drift if f["channel"] == f"nuclei:{names[1]}"}
        assert not {f["field"] for f in drift} & {"A01-0", "A01-1", "A02-0", "A02-2"}, drift

        # The LIMS heard of it, signed.
        [event] = receiver.wait_for(1)
        assert event["type"] == "plate.qc_flagged" and event["data"]["job_id"] == job["id"]
        assert event["data"]["flagged_fields"] == qc["flagged_fields"] and receiver.bad_signatures == 0
        receiver.close()

        # The same plate uploaded as a zip: the labelled plate comes back as a zip.
        copy = tmp_path / "upload" / "p7.ome.zarr"
        shutil.copytree(plate, copy, ignore=shutil.ignore_patterns("labels", "tables"))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for path in copy.rglob("*"):
                if path.is_file():
                    archive.write(path, str(path.relative_to(copy.parent)))
        job = _segment(
            client, api, _request(wells=["A02"]), files={"plate": ("p7.zip", buffer.getvalue(), "application/zip")}
        )
        assert job["status"] == "succeeded" and job["summary"]["fields_done"] == 3
        out = tmp_path / "out"
        zipfile.ZipFile(
            io.BytesIO(client.get(f"/api/v1/jobs/{job['id']}/results/plate.ome.zarr.zip").content)
        ).extractall(out)
        back, meta = ome_zarr_io.read_labels(out / "p7.ome.zarr", "A/2/0", "nuclei")
        assert back.max() > 0 and meta["source"]["cellfuse"]["job_id"] == job["id"]
