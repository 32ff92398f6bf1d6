"""Segment an OME-Zarr HCS plate: a folder the workers can read (under an allowed root), or an
uploaded zipped plate. The plate's metadata is validated here, before any job exists."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Response, UploadFile
from pydantic import Field, ValidationError

from app import zoo
from app.api.deps import BlobsDep, InstrumentDep, SessionDep, SettingsDep
from app.api.errors import Problem
from app.api.routes.submit import _accepted, field_name, plan_request_models
from app.api.schemas import MODEL_DESCRIPTION, JobOut, ModelChoice
from app.api.uploads import read_upload
from app.job_params import FieldSpec, OmeZarrSource, SegmentJob, SegmentParams, StrictModel
from app.settings import Settings
from app.vocabulary import DEFAULT_ALIAS, MethodLiteral, ObjectLiteral

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


class OmeZarrSegmentRequest(StrictModel):
    cell_line: str = Field(min_length=1, max_length=120)
    path: str | None = Field(
        default=None,
        max_length=4000,
        description="the plate folder on the workers' storage (under CELLFUSE_OME_ZARR_ROOTS); "
        "labels and tables are written into it. Omit when uploading a zip.",
    )
    wells: list[str] | None = Field(default=None, max_length=1536, description="only these wells (A01 or A/1)")
    channel_map: dict[str, str] = Field(
        default_factory=dict, description="plate channel name (omero label) -> reporter; default: same name"
    )
    objects: list[ObjectLiteral] = Field(default_factory=lambda: ["nuclei", "cells"], min_length=1, max_length=2)  # type: ignore[arg-type]
    method: MethodLiteral = "flow_fusion"
    use_channels: list[str] | None = Field(default=None, max_length=8)
    alias: str = Field(default=DEFAULT_ALIAS, max_length=60)
    model: ModelChoice = Field(default="zoo", description=MODEL_DESCRIPTION)
    models: dict[str, ModelChoice] | None = Field(default=None, max_length=8, description="per reporter")
    plate: str | None = Field(default=None, max_length=120, description="plate name; default: the plate's own")
    params: SegmentParams = Field(default_factory=SegmentParams)


def _allowed_path(raw: str, settings: Settings) -> Path:
    if not settings.ome_zarr_roots:
        raise Problem(
            422,
            "this server reads no plates from its storage (CELLFUSE_OME_ZARR_ROOTS is empty); "
            "upload the plate as a zip instead",
            slug="ome-zarr-path-not-allowed",
        )
    path = Path(os.path.realpath(raw))
    roots = [Path(os.path.realpath(r)) for r in settings.ome_zarr_roots]
    if not any(path == root or root in path.parents for root in roots):
        raise Problem(
            422,
            f"{raw!r} is not under an allowed plate folder ({', '.join(map(str, roots))})",
            slug="ome-zarr-path-not-allowed",
        )
    if not path.is_dir():
        raise Problem(422, f"no plate folder at {raw!r}", slug="invalid-ome-zarr")
    if not os.access(path, os.W_OK):
        raise Problem(
            422,
            f"{raw!r} is not writable: CellFuse writes the labels next to each image; give a "
            "writable copy, or upload the plate as a zip",
            slug="ome-zarr-read-only",
        )
    return path


def _read(path: Path, wells: list[str] | None, settings: Settings):
    from app.science.ome_zarr_io import OmeZarrError, read_plate

    try:
        return read_plate(path, wells=wells, max_pixels=None)
    except OmeZarrError as exc:
        raise Problem(
            422,
            f"the OME-Zarr plate cannot be segmented: {exc}",
            slug="invalid-ome-zarr",
            well=exc.well,
            field=exc.field,
        )


@router.post(
    "/segment-ome-zarr",
    response_model=JobOut,
    status_code=202,
    summary="Segment an OME-Zarr HCS plate (a server folder or an uploaded zip); labels go next to "
    "each image, a measurements table into each well",
)
def submit_segment_ome_zarr(
    session: SessionDep,
    settings: SettingsDep,
    blobs: BlobsDep,
    principal: InstrumentDep,
    response: Response,
    request: Annotated[str, Form(description="JSON: OmeZarrSegmentRequest", max_length=200_000)],
    plate: Annotated[UploadFile | None, File(description="a zipped .ome.zarr plate")] = None,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    try:
        req = OmeZarrSegmentRequest.model_validate_json(request)
    except ValidationError as exc:
        errors = [{"location": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
        raise Problem(
            422,
            "the request is not valid: " + "; ".join(f"{e['location']}: {e['message']}" for e in errors[:5]),
            slug="validation-error",
            errors=errors,
        )
    if (req.path is None) == (plate is None):
        raise Problem(
            422, "give either 'path' (a plate on the server) or a zipped plate upload, not both", slug="ome-zarr-source"
        )
    line = zoo.cell_line_by_name(session, req.cell_line)
    if req.path is not None:
        root = _allowed_path(req.path, settings)
        info = _read(root, req.wells, settings)
        source = OmeZarrSource(path=str(root), version=info.version, wells=req.wells, channel_names=info.channel_names)
        stored_zip = None
    else:
        from app.zipped_plates import ZipPlateError, find_plate_root, remove, unpack

        data = read_upload(plate, settings.max_upload_bytes)  # type: ignore[arg-type]
        tmp_root = settings.resolved_data_dir / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=tmp_root, prefix="plate-"))
        try:
            zip_path = folder / "plate.zip"
            zip_path.write_bytes(data)
            try:
                unpack(zip_path, folder / "x", max_bytes=settings.max_request_bytes)
                root = find_plate_root(folder / "x")
            except ZipPlateError as exc:
                raise Problem(422, f"the plate upload cannot be used: {exc}", slug="invalid-ome-zarr")
            info = _read(root, req.wells, settings)
            root_in_zip = root.relative_to(folder / "x").as_posix()
        finally:
            remove(folder)
        stored_zip = data
        source = None
    reporters = [req.channel_map.get(name, name) for name in info.channel_names]
    unknown = []
    for name in reporters:
        if (req.models or {}).get(name, req.model) != "zoo":  # a base model needs no registered reporter
            continue
        try:
            zoo.reporter_by_name(session, name)
        except zoo.NotFound:
            unknown.append(name)
    if unknown:
        raise Problem(
            422,
            f"the plate's channel(s) {', '.join(unknown)} are not registered reporters; register them "
            "or map the plate's channel names to reporters with 'channel_map'",
            slug="unknown-channel",
            channels=info.channel_names,
        )
    plan = plan_request_models(session, line, reporters, list(req.objects), req)
    plate_name = req.plate or info.name
    fields = [
        FieldSpec(name=field_name(f.well, f.index), well=f.well, field=f.index, zarr_path=f.path) for f in info.fields
    ]
    if stored_zip is not None:  # only now, when everything is valid, is anything stored
        source = OmeZarrSource(
            zip_sha256=blobs.put_bytes(stored_zip).sha256,
            root_in_zip=root_in_zip,
            version=info.version,
            wells=req.wells,
            channel_names=info.channel_names,
        )
    params = SegmentJob(
        cell_line=line.name,
        channels=reporters,
        objects=list(req.objects),
        method=req.method,
        alias=req.alias,
        plate=plate_name,
        plan=plan,
        fields=fields,
        params=req.params,
        ome_zarr=source,
    )
    return _accepted(session, settings, "segment", params, principal, idempotency_key, response)
