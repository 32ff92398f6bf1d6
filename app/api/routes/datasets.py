"""Labelled datasets: images (TIFF, OME-TIFF, one file per channel) with nuclei and cell masks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, Response, UploadFile
from sqlalchemy import select

from app import zoo
from app.api.deps import BlobsDep, IdPath, PageDep, ScientistDep, SessionDep, SettingsDep
from app.api.errors import Problem
from app.api.schemas import DatasetImageOut, DatasetIn, DatasetOut, SplitLiteral
from app.api.uploads import display_name, upload_size, upload_source
from app.models import Dataset, DatasetImage
from app.science.image_files import (
    ImageReadError,
    image_to_tiff_bytes,
    read_image,
    read_labels,
)
from app.storage import BlobStore, StoredBlob

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/datasets", tags=["datasets"])

WELL_PATTERN = r"^[A-Za-z]{1,2}[0-9]{1,3}$"


def dataset_out(ds: Dataset) -> DatasetOut:
    counts: dict[str, int] = {}
    for image in ds.images:
        key = image.split or "unassigned"
        counts[key] = counts.get(key, 0) + 1
    return DatasetOut(
        id=ds.id,
        name=ds.name,
        cell_line=ds.cell_line.name,
        channels=ds.channels,
        acquisition=ds.acquisition or {},
        notes=ds.notes,
        images=[DatasetImageOut.model_validate(i) for i in ds.images],
        split_counts=counts,
    )


@router.post("", response_model=DatasetOut, status_code=201, summary="Create a dataset for a cell line")
def create_dataset(body: DatasetIn, session: SessionDep, principal: ScientistDep) -> DatasetOut:
    line = zoo.cell_line_by_name(session, body.cell_line)
    if len(set(body.channels)) != len(body.channels):
        raise Problem(422, "each channel must map to a different reporter", slug="duplicate-channels")
    for name in body.channels:
        zoo.reporter_by_name(session, name)
    ds = Dataset(
        name=body.name,
        cell_line_id=line.id,
        channels=body.channels,
        acquisition=body.acquisition,
        notes=body.notes,
        owner_key_id=principal.key_id,
    )
    session.add(ds)
    session.flush()
    out = dataset_out(ds)  # a row that cannot be presented is never committed
    session.commit()
    return out


@router.get("", response_model=list[DatasetOut], summary="List datasets (paged; total in X-Total-Count)")
def list_datasets(session: SessionDep, _: ScientistDep, page: PageDep, response: Response) -> list[DatasetOut]:
    return [dataset_out(d) for d in page.rows(session, select(Dataset).order_by(Dataset.id), response)]


@router.get("/{dataset_id}", response_model=DatasetOut, summary="One dataset with its images and splits")
def get_dataset(dataset_id: IdPath, session: SessionDep, _: ScientistDep) -> DatasetOut:
    return dataset_out(zoo.dataset_by_id(session, dataset_id))


@dataclass
class LoadedImage:
    """A validated field: its pixels, and how to store it (the upload as sent, or one stacked TIFF)."""

    data: np.ndarray | None
    filename: str
    upload: UploadFile | None = None
    stacked: bytes | None = None

    def store(self, blobs: BlobStore) -> StoredBlob:
        if self.upload is not None:
            self.upload.file.seek(0)
            return blobs.put_file(self.upload.file)
        return blobs.put_bytes(self.stacked or b"")


def _read_channels(upload: UploadFile, max_bytes: int, max_pixels: int) -> np.ndarray:
    upload_size(upload, max_bytes)
    try:
        return read_image(upload_source(upload), max_pixels=max_pixels).data
    except ImageReadError as exc:
        raise Problem(422, f"{display_name(upload.filename)}: {exc}", slug="invalid-image")
    except Exception as exc:  # a reader bug on untrusted bytes is the file's problem, not a 500
        log.warning("reading %s failed unexpectedly", display_name(upload.filename), exc_info=True)
        raise Problem(
            422,
            f"{display_name(upload.filename)} could not be read as a TIFF image "
            f"({type(exc).__name__}); send a plain TIFF or OME-TIFF",
            slug="invalid-image",
        )


#: Smaller fields cannot be segmented or trained on (the network downsamples 8x); refused at upload.
MIN_FIELD_SIDE = 16


def _check_field_size(data: np.ndarray, filename: str) -> None:
    if min(data.shape[1:]) < MIN_FIELD_SIDE:
        raise Problem(
            422,
            f"{filename} is {data.shape[1]}×{data.shape[2]} pixels; a field must be at least "
            f"{MIN_FIELD_SIDE}×{MIN_FIELD_SIDE}",
            slug="image-too-small",
            min_side=MIN_FIELD_SIDE,
        )


def load_image(uploads: list[UploadFile], max_bytes: int, max_pixels: int) -> LoadedImage:
    """One multi-channel image from one file, or from one single-channel file per channel."""
    if len(uploads) == 1:
        data = _read_channels(uploads[0], max_bytes, max_pixels)
        _check_field_size(data, display_name(uploads[0].filename))
        return LoadedImage(data=data, filename=display_name(uploads[0].filename), upload=uploads[0])
    images = [_read_channels(upload, max_bytes, max_pixels) for upload in uploads]
    shapes = {img.shape[1:] for img in images}
    if any(img.shape[0] != 1 for img in images) or len(shapes) != 1:
        raise Problem(
            422, "with several files per image, each must be one channel of the same size", slug="invalid-image"
        )
    stacked = np.concatenate(images, axis=0)
    names = "+".join(display_name(u.filename) for u in uploads)
    _check_field_size(stacked, names[:200])
    return LoadedImage(data=stacked, filename=names[:255], stacked=image_to_tiff_bytes(stacked))


def _load_mask(
    upload: UploadFile | None, shape: tuple[int, ...], what: str, max_bytes: int, max_pixels: int
) -> UploadFile | None:
    if upload is None:
        return None
    upload_size(upload, max_bytes)
    try:
        labels = read_labels(upload_source(upload), max_pixels=max_pixels)
    except ImageReadError as exc:
        raise Problem(422, f"{what} mask {display_name(upload.filename)}: {exc}", slug="invalid-mask")
    except Exception as exc:  # a reader bug on untrusted bytes is the file's problem, not a 500
        log.warning("reading mask %s failed unexpectedly", display_name(upload.filename), exc_info=True)
        raise Problem(
            422,
            f"{what} mask {display_name(upload.filename)} could not be read as a TIFF label "
            f"image ({type(exc).__name__})",
            slug="invalid-mask",
        )
    if labels.shape != shape:
        raise Problem(
            422,
            f"the {what} mask is {labels.shape[0]}×{labels.shape[1]} but the image is {shape[0]}×{shape[1]}",
            slug="mask-shape-mismatch",
        )
    upload.file.seek(0)
    return upload


@router.post(
    "/{dataset_id}/images",
    response_model=DatasetImageOut,
    status_code=201,
    summary="Add an image (one multi-channel file, or one file per channel) with its masks",
)
def add_image(
    dataset_id: IdPath,
    session: SessionDep,
    settings: SettingsDep,
    blobs: BlobsDep,
    _: ScientistDep,
    image: Annotated[list[UploadFile], File(description="TIFF/OME-TIFF; several = one per channel")],
    nuclei: Annotated[UploadFile | None, File(description="nuclei instance mask")] = None,
    cells: Annotated[UploadFile | None, File(description="cell instance mask")] = None,
    plate: Annotated[str | None, Form(max_length=120)] = None,
    well: Annotated[str | None, Form(pattern=WELL_PATTERN)] = None,
    field: Annotated[int | None, Form(ge=0, le=100_000)] = None,
    split: Annotated[SplitLiteral | None, Form()] = None,
) -> DatasetImage:
    ds = zoo.dataset_by_id(session, dataset_id)
    loaded = load_image(image, settings.max_upload_bytes, settings.max_image_pixels)
    data = loaded.data
    assert data is not None  # freed only after it is stored, below
    if data.shape[0] != len(ds.channels):
        raise Problem(
            422,
            f"the image has {data.shape[0]} channel(s) but dataset {ds.id} maps "
            f"{len(ds.channels)} ({', '.join(ds.channels)})",
            slug="channel-count-mismatch",
        )
    shape, n_channels = data.shape[1:], data.shape[0]
    nuclei_file = _load_mask(nuclei, shape, "nuclei", settings.max_upload_bytes, settings.max_image_pixels)
    cells_file = _load_mask(cells, shape, "cells", settings.max_upload_bytes, settings.max_image_pixels)
    del data  # the pixels were only needed to validate
    loaded.data = None
    # Everything is validated before anything is stored: a refused upload leaves nothing behind.
    image_blob = loaded.store(blobs)
    nuclei_sha = blobs.put_file(nuclei_file.file).sha256 if nuclei_file else None
    cells_sha = blobs.put_file(cells_file.file).sha256 if cells_file else None
    row = DatasetImage(
        dataset_id=ds.id,
        image_sha256=image_blob.sha256,
        filename=loaded.filename,
        height=int(shape[0]),
        width=int(shape[1]),
        n_channels=int(n_channels),
        nuclei_sha256=nuclei_sha,
        cells_sha256=cells_sha,
        plate=plate,
        well=well,
        field=field,
        split=split,
    )
    session.add(row)
    session.commit()
    session.refresh(row)
    return row
