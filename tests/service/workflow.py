"""Building blocks for end-to-end tests: a tiny base model, a small synthetic dataset."""

from __future__ import annotations

import io

import numpy as np

from app.client import CellFuseClient
from app.science.image_files import image_to_tiff_bytes, labels_to_tiff_bytes
from app.science.synthetic import DEFAULT_REPORTERS, make_plate

TINY_WIDTHS = (8, 16, 32, 64)
CELL_LINE = "U2OS-test"


def tiny_base_weights(seed: int = 0) -> bytes:
    """A randomly initialised tiny CPnet as safetensors bytes (what an admin would upload)."""
    import torch
    from safetensors.torch import save

    from app.science.backbone import build_network

    torch.manual_seed(seed)
    net = build_network(TINY_WIDTHS)
    return save({k: v.contiguous() for k, v in net.state_dict().items()})


def register_tiny_base(client: CellFuseClient, name: str = "tiny-random") -> str:
    response = client.http.post(
        "/api/v1/base-models",
        data={"name": name, "diam_mean": "30"},
        files={"weights": ("tiny.safetensors", tiny_base_weights(), "application/octet-stream")},
    )
    assert response.status_code == 201, response.text
    return name


def small_plate(n_fields: int = 8, size: int = 128, n_channels: int = 2, seed: int = 3):
    return make_plate(n_fields, size=size, seed=seed, reporters=DEFAULT_REPORTERS[:n_channels])


def upload_dataset(client: CellFuseClient, fields, *, name: str = "plate-1", splits=None) -> dict:
    channels = fields[0].channel_names
    client.ensure_cell_line(CELL_LINE, species="human")
    for reporter in channels:
        client.ensure_reporter(reporter, localisation=reporter)
    ds = client.create_dataset(name, CELL_LINE, channels, acquisition={"objective": "20x"})
    for i, f in enumerate(fields):
        client.add_image(
            ds["id"],
            image_to_tiff_bytes(f.image.astype(np.uint16), channels),
            nuclei_tiff=labels_to_tiff_bytes(f.nuclei),
            cells_tiff=labels_to_tiff_bytes(f.cells),
            well=f.well,
            field=f.field,
            split=splits[i] if splits else None,
        )
    return client.get(f"/api/v1/datasets/{ds['id']}")


def field_tiff(field) -> bytes:
    return image_to_tiff_bytes(field.image.astype(np.uint16), field.channel_names)


def tiff_to_array(data: bytes) -> np.ndarray:
    import tifffile

    return tifffile.imread(io.BytesIO(data))


def add_ready_version_of_base(factory, base_name: str) -> None:
    """A ready nuclei version of the first reporter on the first cell line, with ``base_name``'s
    weights (a zoo model without a fine-tune)."""
    from sqlalchemy import select

    from app.models import BaseNetwork, CellLine, ModelVersion, Reporter

    with factory() as session:
        base = session.scalar(select(BaseNetwork).where(BaseNetwork.name == base_name))
        session.add(
            ModelVersion(
                cell_line_id=session.scalar(select(CellLine.id)),
                object="nuclei",
                version=1,
                reporter_id=session.scalar(select(Reporter.id)),
                status="ready",
                weights_sha256=base.weights_sha256,
                card=base.card,
                diameter=17.0,
            )
        )
        session.commit()


def ready_segmentation_job(settings, fields) -> tuple:
    """A queued nuclei segmentation of ``fields`` (one channel) through a ready zoo version of the
    tiny base, not yet run: (client, session factory, job id, field names in plate order)."""
    from app.db import session_factory
    from app.job_params import SegmentJob
    from app.models import Job
    from tests.service.conftest import make_client

    client, _ = make_client(settings, run_reaper=False)
    api = CellFuseClient(client)
    base_name = register_tiny_base(api)
    ds = upload_dataset(api, fields)
    factory = session_factory(settings.resolved_database_url)
    add_ready_version_of_base(factory, base_name)
    response = client.post("/api/v1/jobs/segment-dataset", json={"dataset_id": ds["id"], "objects": ["nuclei"]})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    with factory() as session:
        names = [f.name for f in SegmentJob.model_validate(session.get(Job, job_id).params).fields]
    return client, factory, job_id, names
