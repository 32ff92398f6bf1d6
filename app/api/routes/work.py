"""Job submissions: fine-tune, segment (uploaded fields or a dataset), evaluate, select channels.

Everything a job needs is checked here, before the job exists: unknown names, channel counts,
missing models. A refused request leaves no job and no stored file behind.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, Response, UploadFile
from pydantic import ValidationError
from sqlalchemy.orm import Session

from app import zoo
from app.api.deps import BlobsDep, InstrumentDep, ScientistDep, SessionDep, SettingsDep
from app.api.errors import Problem
from app.api.jobs_service import job_out, submit_job
from app.api.routes.datasets import load_channels
from app.api.schemas import (
    MAX_ID,
    EvaluateIn,
    FinetuneIn,
    JobOut,
    SegmentDatasetIn,
    SegmentRequest,
    SelectChannelsIn,
)
from app.models import CellLine, Dataset
from app.security import Principal
from app.settings import Settings

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


def _accepted(session: Session, settings: Settings, kind: str, params: dict[str, Any], principal: Principal,
              idempotency_key: str | None, response: Response) -> JobOut:
    job, created = submit_job(session, settings, kind, params, principal, idempotency_key)
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    if not created:
        response.status_code = 200
    return job_out(job)


def _check_subset(use: list[str] | None, channels: list[str]) -> None:
    if use is None:
        return
    unknown = [c for c in use if c not in channels]
    if unknown:
        raise Problem(422, f"channel(s) {', '.join(unknown)} are not among this image's channels "
                      f"({', '.join(channels)})", slug="unknown-channel")
    if len(set(use)) != len(use):
        raise Problem(422, "use_channels lists a channel twice", slug="duplicate-channels")


def plan_models(session: Session, line: CellLine, channels: list[str], objects: list[str],
                use_channels: list[str] | None, alias: str) -> dict[str, dict[str, Any]]:
    """Per object: the channels to fuse and the model version per channel. Missing models are a 422."""
    _check_subset(use_channels, channels)
    plan: dict[str, dict[str, Any]] = {}
    for obj in objects:
        if use_channels is not None:
            use, how = list(use_channels), "request"
        else:
            chosen = zoo.chosen_channels(session, line.id, obj)
            use = [c for c in (chosen.chosen if chosen else []) if c in channels]
            how = "zoo channel set" if use else "all channels"
            if not use:
                use = list(channels)
        res = zoo.resolve_models(session, line, use, obj, alias)
        if res.missing:
            raise Problem(422, f"no {obj} model for reporter(s) {', '.join(res.missing)} on cell line "
                          f"{line.name!r}; fine-tune one or leave the channel out (use_channels)",
                          slug="missing-model", missing=res.missing, object=obj)
        plan[obj] = {"channels": use, "channel_source": how,
                     "models": {name: res.models[name].id for name in use}}
    return plan


@router.post("/finetune", response_model=JobOut, status_code=202,
             summary="Fine-tune a model for one (cell line, reporter, object) on a dataset")
def submit_finetune(body: FinetuneIn, session: SessionDep, settings: SettingsDep, principal: ScientistDep,
                    response: Response, idempotency_key: IdempotencyKey = None) -> JobOut:
    ds = zoo.dataset_by_id(session, body.dataset_id)
    if body.reporter not in ds.channels:
        raise Problem(422, f"dataset {ds.id} has no channel {body.reporter!r} (it has {', '.join(ds.channels)})",
                      slug="unknown-channel")
    mask_attr = "nuclei_sha256" if body.object == "nuclei" else "cells_sha256"
    labelled = sum(1 for im in ds.images if getattr(im, mask_attr))
    if labelled < 3:
        raise Problem(422, f"dataset {ds.id} has {labelled} image(s) with {body.object} masks; fine-tuning "
                      "needs at least 3 (training, validation, test)", slug="too-few-labelled-images")
    base = body.base
    if base.startswith("version:"):
        number = base.split(":", 1)[1].strip()
        if not number.isdigit() or not 1 <= int(number) <= MAX_ID:
            raise Problem(422, "base 'version:<id>' needs a model version number", slug="bad-base")
        zoo.model_version_by_id(session, int(number))
    elif base:
        zoo.base_model_by_name(session, base)
    else:
        from sqlalchemy import select

        from app.models import BaseModel

        shipped = session.scalar(select(BaseModel).where(BaseModel.source == "shipped").order_by(BaseModel.id))
        if shipped is None:
            raise Problem(422, "no base model is registered; upload one or name one in 'base'", slug="no-base-model")
        base = shipped.name
    params = body.model_dump()
    params["base"] = base
    params["cell_line"] = ds.cell_line.name
    return _accepted(session, settings, "finetune", params, principal, idempotency_key, response)


@router.post("/segment", response_model=JobOut, status_code=202,
             summary="Segment uploaded fields (a plate: one file per field) with Flow Fusion or a baseline")
def submit_segment(session: SessionDep, settings: SettingsDep, blobs: BlobsDep, principal: InstrumentDep,
                   response: Response,
                   request: Annotated[str, Form(description="JSON: SegmentRequest", max_length=200_000)],
                   files: Annotated[list[UploadFile], File(description="one TIFF/OME-TIFF per field")],
                   idempotency_key: IdempotencyKey = None) -> JobOut:
    try:
        req = SegmentRequest.model_validate_json(request)
    except ValidationError as exc:
        errors = [{"location": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
        raise Problem(422, "the segmentation request is not valid: " +
                      "; ".join(f"{e['location']}: {e['message']}" for e in errors[:5]),
                      slug="validation-error", errors=errors)
    if req.fields and len(req.fields) != len(files):
        raise Problem(422, f"'fields' describes {len(req.fields)} field(s) but {len(files)} file(s) were sent",
                      slug="fields-mismatch")
    line = zoo.cell_line_by_name(session, req.cell_line)
    for name in req.channels:
        zoo.reporter_by_name(session, name)
    plan = plan_models(session, line, req.channels, list(req.objects), req.use_channels, req.alias)
    loaded = []
    for index, upload in enumerate(files):
        data, raw, filename = load_channels([upload], settings.max_upload_bytes, settings.max_image_pixels)
        if data.shape[0] != len(req.channels):
            raise Problem(422, f"{filename} has {data.shape[0]} channel(s) but the request maps "
                          f"{len(req.channels)} ({', '.join(req.channels)})", slug="channel-count-mismatch")
        meta = req.fields[index].model_dump() if req.fields else {}
        well, field = str(meta.get("well") or f"F{index + 1:03d}")[:8], int(meta.get("field") or 1)
        loaded.append((raw, {"name": _field_name(well, field, index), "well": well, "field": field,
                             "filename": filename}))
    # All files are valid: only now store them.
    fields = []
    for raw, meta in loaded:
        meta["image_sha256"] = blobs.put_bytes(raw).sha256
        fields.append(meta)
    params = {"cell_line": line.name, "channels": req.channels, "objects": list(req.objects),
              "method": req.method, "alias": req.alias, "plate": req.plate, "plan": plan, "fields": fields,
              "params": req.params.model_dump()}
    return _accepted(session, settings, "segment", params, principal, idempotency_key, response)


def _field_name(well: str, field: int, index: int) -> str:
    safe_well = "".join(ch for ch in well if ch.isalnum()) or f"F{index + 1:03d}"
    return f"{safe_well}-{field}"


@router.post("/segment-dataset", response_model=JobOut, status_code=202,
             summary="Segment the images of a dataset (with metrics against its masks)")
def submit_segment_dataset(body: SegmentDatasetIn, session: SessionDep, settings: SettingsDep,
                           principal: ScientistDep, response: Response,
                           idempotency_key: IdempotencyKey = None) -> JobOut:
    ds = zoo.dataset_by_id(session, body.dataset_id)
    plan = plan_models(session, ds.cell_line, ds.channels, list(body.objects), body.use_channels, body.alias)
    images = [im for im in ds.images if body.split is None or im.split == body.split]
    if not images:
        raise Problem(422, f"dataset {ds.id} has no images in split {body.split!r}", slug="empty-split")
    fields = [{"name": _field_name(im.well or f"I{im.id}", im.field or 1, i), "well": im.well, "field": im.field,
               "filename": im.filename, "image_sha256": im.image_sha256, "dataset_image_id": im.id}
              for i, im in enumerate(images)]
    params = {"cell_line": ds.cell_line.name, "channels": ds.channels, "objects": list(body.objects),
              "method": body.method, "alias": body.alias, "plan": plan, "fields": fields,
              "dataset_id": ds.id, "params": body.params.model_dump()}
    return _accepted(session, settings, "segment", params, principal, idempotency_key, response)


@router.post("/evaluate", response_model=JobOut, status_code=202,
             summary="Evaluate a model version, or a fusion setting, on a labelled dataset")
def submit_evaluate(body: EvaluateIn, session: SessionDep, settings: SettingsDep, principal: ScientistDep,
                    response: Response, idempotency_key: IdempotencyKey = None) -> JobOut:
    ds: Dataset = zoo.dataset_by_id(session, body.dataset_id)
    params: dict[str, Any] = {"dataset_id": ds.id, "split": body.split}
    if body.model_version_id is not None:
        version = zoo.model_version_by_id(session, body.model_version_id)
        if version.status not in ("ready", "archived"):
            raise Problem(409, f"model version {version.id} is {version.status}", slug="version-not-ready")
        if version.reporter.name not in ds.channels:
            raise Problem(422, f"dataset {ds.id} has no channel for reporter {version.reporter.name!r}",
                          slug="unknown-channel")
        params.update(model_version_id=version.id, object=version.object, reporter=version.reporter.name)
    else:
        if body.object is None:
            raise Problem(422, "give either model_version_id, or object (with optional use_channels and method)",
                          slug="evaluate-target-missing")
        plan = plan_models(session, ds.cell_line, ds.channels, [body.object], body.use_channels, body.alias)
        params.update(object=body.object, method=body.method, plan=plan)
    _check_split_labelled(ds, body.split, params["object"])
    return _accepted(session, settings, "evaluate", params, principal, idempotency_key, response)


def _check_split_labelled(ds: Dataset, split: str, obj: str) -> None:
    attr = "nuclei_sha256" if obj == "nuclei" else "cells_sha256"
    if not any(im.split == split and getattr(im, attr) for im in ds.images):
        raise Problem(422, f"dataset {ds.id} has no {obj}-labelled images in split {split!r}; "
                      "assign splits when uploading or run a fine-tune first", slug="empty-split")


@router.post("/select-channels", response_model=JobOut, status_code=202,
             summary="Rank every channel subset for a (cell line, object) and store the best")
def submit_select_channels(body: SelectChannelsIn, session: SessionDep, settings: SettingsDep,
                           principal: ScientistDep, response: Response,
                           idempotency_key: IdempotencyKey = None) -> JobOut:
    ds = zoo.dataset_by_id(session, body.dataset_id)
    plan = plan_models(session, ds.cell_line, ds.channels, [body.object], list(ds.channels), body.alias)
    _check_split_labelled(ds, body.split, body.object)
    params = {**body.model_dump(), "plan": plan, "cell_line": ds.cell_line.name}
    return _accepted(session, settings, "select_channels", params, principal, idempotency_key, response)
