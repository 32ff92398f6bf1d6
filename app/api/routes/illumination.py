"""Illumination profiles: flatfields estimated per plate or dataset by jobs, or uploaded by a lab.

A profile is a versioned artefact: each estimate or upload is a new row with its inputs; jobs name
the one they used in their provenance and model cards.
"""

from __future__ import annotations

import io
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from app.api.deps import BlobsDep, IdPath, InstrumentDep, ScientistDep, SessionDep, SettingsDep
from app.api.errors import Problem
from app.api.uploads import display_name, read_upload
from app.models import IlluminationProfile

router = APIRouter(prefix="/api/v1/illumination-profiles", tags=["preprocessing"])


class IlluminationProfileOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    source: str
    method: str
    channels: list[str]
    height: int
    width: int
    has_darkfield: bool
    blob_sha256: str
    inputs: dict[str, Any]
    summary: dict[str, Any]
    dataset_id: int | None
    job_id: str | None


def profile_by_id(session, profile_id: int) -> IlluminationProfile:
    row = session.get(IlluminationProfile, profile_id)
    if row is None:
        raise Problem(404, f"no illumination profile with id {profile_id}", slug="profile-not-found")
    return row


@router.get("", response_model=list[IlluminationProfileOut], summary="Illumination profiles, newest first")
def list_profiles(
    session: SessionDep, _principal: InstrumentDep, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> list[IlluminationProfile]:
    return list(session.scalars(select(IlluminationProfile).order_by(IlluminationProfile.id.desc()).limit(limit)))


@router.get("/{profile_id}", response_model=IlluminationProfileOut, summary="One illumination profile")
def get_profile(profile_id: IdPath, session: SessionDep, _principal: InstrumentDep) -> IlluminationProfile:
    return profile_by_id(session, profile_id)


@router.post(
    "",
    response_model=IlluminationProfileOut,
    status_code=201,
    summary="Upload a measured flat-field (e.g. a uniform dye slide): TIFF (C, Y, X) or (Y, X)",
)
def upload_profile(
    session: SessionDep,
    settings: SettingsDep,
    blobs: BlobsDep,
    _principal: ScientistDep,
    name: Annotated[str, Form(min_length=1, max_length=200)],
    channels: Annotated[str, Form(description="reporter names, comma-separated, one per plane")],
    flatfield: Annotated[UploadFile, File(description="float or integer TIFF, > 0 everywhere")],
    darkfield: Annotated[UploadFile | None, File(description="optional, same shape")] = None,
) -> IlluminationProfile:
    from app.science.preprocessing import (
        IlluminationModel,
        PreprocessingError,
        illumination_from_tiff,
        illumination_to_tiff,
    )

    names = [c.strip() for c in channels.split(",") if c.strip()]
    if not names or len(set(names)) != len(names):
        raise Problem(422, "give one distinct reporter name per flat-field plane in 'channels'", slug="bad-channels")
    try:
        model = illumination_from_tiff(read_upload(flatfield, settings.max_upload_bytes), method="reference")
        dark = None if darkfield is None else _darkfield(read_upload(darkfield, settings.max_upload_bytes))
        if dark is not None and dark.shape != model.flatfield.shape:
            raise PreprocessingError(f"the darkfield is {dark.shape} but the flatfield is {model.flatfield.shape}")
    except PreprocessingError as exc:
        raise Problem(422, f"{display_name(flatfield.filename)}: {exc}", slug="invalid-profile") from None
    if model.flatfield.shape[0] != len(names):
        raise Problem(
            422,
            f"the flat-field has {model.flatfield.shape[0]} plane(s) but 'channels' names "
            f"{len(names)} ({', '.join(names)})",
            slug="profile-channel-mismatch",
        )
    stored = IlluminationModel(flatfield=model.flatfield, darkfield=dark, method="reference")
    blob = blobs.put_bytes(illumination_to_tiff(stored))
    height, width = model.flatfield.shape[1:]
    row = IlluminationProfile(
        name=name,
        source="uploaded",
        method="reference",
        channels=names,
        height=int(height),
        width=int(width),
        has_darkfield=dark is not None,
        blob_sha256=blob.sha256,
        inputs={"filename": display_name(flatfield.filename)},
        summary=stored.summary(),
    )
    session.add(row)
    session.commit()
    return row


def _darkfield(data: bytes) -> np.ndarray:
    """A darkfield as (C, Y, X) float32: what the camera reads without light, finite."""
    import tifffile

    from app.science.preprocessing import PreprocessingError

    try:
        array = np.asarray(tifffile.imread(io.BytesIO(data)), dtype=np.float32)
    except Exception as exc:  # a user's file: any reader failure is a bad file
        raise PreprocessingError(f"the darkfield is not a readable TIFF ({exc})") from None
    if not np.isfinite(array).all():
        raise PreprocessingError("the darkfield has non-finite values")
    return array[np.newaxis] if array.ndim == 2 else array


@router.get(
    "/{profile_id}/preview.png",
    summary="A channel's flat-field as a greyscale PNG (for the page)",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def preview_profile(
    profile_id: IdPath,
    session: SessionDep,
    blobs: BlobsDep,
    _principal: InstrumentDep,
    channel: Annotated[int, Query(ge=0, le=15)] = 0,
) -> Response:
    from PIL import Image

    from app.science.preprocessing import illumination_from_tiff

    row = profile_by_id(session, profile_id)
    if channel >= len(row.channels):
        raise Problem(422, f"profile {profile_id} has {len(row.channels)} channel(s)", slug="bad-channel")
    flat = illumination_from_tiff(blobs.read_bytes(row.blob_sha256)).flatfield[channel]
    span = float(flat.max() - flat.min()) or 1.0
    scaled = ((flat - flat.min()) / span * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(scaled).save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png")
