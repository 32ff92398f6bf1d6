"""Job submissions: fine-tune, segment (uploaded fields or a dataset), evaluate, select channels.

Everything a job needs is checked here, before the job exists: unknown names, channel counts,
missing models. A refused request leaves no job and no stored file behind.
"""

from __future__ import annotations

from typing import Annotated, Any, Protocol

from fastapi import APIRouter, File, Form, Header, Response, UploadFile
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import zoo
from app.api.deps import BlobsDep, InstrumentDep, ScientistDep, SessionDep, SettingsDep
from app.api.errors import Problem
from app.api.job_records import job_out, submit_job
from app.api.routes.datasets import load_image
from app.api.schemas import (
    MAX_ID,
    EvaluateIn,
    FinetuneIn,
    JobOut,
    PretrainISLIn,
    SegmentDatasetIn,
    SegmentRequest,
    SelectChannelsIn,
    SelfTrainIn,
)
from app.job_params import (
    EvaluateJob,
    FieldSpec,
    FinetuneJob,
    JobParams,
    ObjectPlan,
    PreprocessingRecipe,
    PretrainISLJob,
    SegmentJob,
    SelectChannelsJob,
    SelfTrainJob,
    recipe_from_card,
    training_profile_from_card,
)
from app.models import CellLine, Dataset, IlluminationProfile, ModelVersion
from app.security import Principal
from app.settings import Settings

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


def _accepted(
    session: Session,
    settings: Settings,
    kind: str,
    params: JobParams,
    principal: Principal,
    idempotency_key: str | None,
    response: Response,
) -> JobOut:
    job, created = submit_job(session, settings, kind, params.model_dump(mode="json"), principal, idempotency_key)
    response.headers["Location"] = f"/api/v1/jobs/{job.id}"
    if not created:
        response.status_code = 200
    return job_out(job)


def _check_subset(use: list[str] | None, channels: list[str]) -> None:
    if use is None:
        return
    unknown = [c for c in use if c not in channels]
    if unknown:
        raise Problem(
            422,
            f"channel(s) {', '.join(unknown)} are not among this image's channels ({', '.join(channels)})",
            slug="unknown-channel",
        )
    if len(set(use)) != len(use):
        raise Problem(422, "use_channels lists a channel twice", slug="duplicate-channels")


class ModelChoiceRequest(Protocol):
    """What the segment, segment-dataset, OME-Zarr and evaluate requests share for model planning."""

    @property
    def use_channels(self) -> list[str] | None: ...
    @property
    def alias(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def models(self) -> dict[str, str] | None: ...
    @property
    def params(self) -> Any: ...


def plan_request_models(
    session: Session, line: CellLine, channels: list[str], objects: list[str], req: ModelChoiceRequest
) -> dict[str, ObjectPlan]:
    """``plan_models`` with the request's own channel, alias, fusion and model choices."""
    return plan_models(
        session,
        line,
        channels,
        objects,
        req.use_channels,
        req.alias,
        req.params.learned_fusion,
        model=req.model,
        models=req.models,
    )


def plan_models(
    session: Session,
    line: CellLine,
    channels: list[str],
    objects: list[str],
    use_channels: list[str] | None,
    alias: str,
    learned_fusion: bool = True,
    *,
    model: str = "zoo",
    models: dict[str, str] | None = None,
) -> dict[str, ObjectPlan]:
    """Per object: the channels to fuse and the model per channel. Missing models and unknown
    aliases are a 422. With ``learned_fusion`` the fusion parameters the zoo fitted for exactly this
    channel set and these model versions come along (``zoo.fitted_fusion``).

    ``model`` (every channel) and ``models`` (per channel) choose where a channel's model comes
    from: "zoo" (the cell line's version for the reporter and object), "base" / "base:<name>" (a
    base model segmenting directly, zero-shot) or "version:<id>" (one zoo version, by id).
    """
    _check_subset(use_channels, channels)
    unknown = sorted(set(models or {}) - set(channels))
    if unknown:
        raise Problem(
            422,
            f"'models' names channel(s) {', '.join(unknown)} that are not among the image's ({', '.join(channels)})",
            slug="unknown-channel",
        )
    zoo.check_alias(session, line, alias)
    plan: dict[str, ObjectPlan] = {}
    for obj in objects:
        if use_channels is not None:
            use, how = list(use_channels), "request"
        else:
            chosen = zoo.chosen_channels(session, line.id, obj)
            use = [c for c in (chosen.chosen if chosen else []) if c in channels]
            how = "zoo channel set" if use else "all channels"
            if not use:
                use = list(channels)
        choice = {name: (models or {}).get(name, model) for name in use}
        from_zoo = [name for name in use if choice[name] == "zoo"]
        res = zoo.resolve_models(session, line, from_zoo, obj, alias)
        if res.missing:
            raise Problem(
                422,
                f"no {obj} model for reporter(s) {', '.join(res.missing)} on cell line "
                f"{line.name!r}; fine-tune one, leave the channel out (use_channels) or segment it "
                'with a base model ("model": "base")',
                slug="missing-model",
                missing=res.missing,
                object=obj,
            )
        versions = {name: res.models[name].id for name in from_zoo}
        bases: dict[str, int] = {}
        for name in use:
            if choice[name].startswith("version:"):
                versions[name] = _ready_version(session, choice[name], obj).id
            elif choice[name] != "zoo":
                bases[name] = _base_for_choice(session, choice[name]).id
        fitted = learned_fusion and not bases
        fusion, fusion_source = zoo.fitted_fusion(session, line.id, obj, versions) if fitted else (None, None)
        plan[obj] = ObjectPlan(
            channels=use,
            channel_source=how,
            models=versions,
            base_models=bases,
            fusion=fusion,
            fusion_source=fusion_source,
        )
    return plan


def _ready_version(session: Session, choice: str, obj: str) -> ModelVersion:
    version = zoo.model_version_by_id(session, int(choice.split(":", 1)[1]))
    if version.status not in ("ready", "archived") or version.weights_sha256 is None:
        raise Problem(409, f"model version {version.id} is {version.status}", slug="version-not-ready")
    if version.object != obj:
        raise Problem(
            422, f"model version {version.id} segments {version.object}, not {obj}", slug="wrong-object-model"
        )
    return version


def _base_for_choice(session: Session, choice: str):
    """'base' is the newest shipped base; 'base:<name>' a registered one (422 when there is none)."""
    from app.models import BaseNetwork

    if choice == "base":
        newest = session.scalar(
            select(BaseNetwork).where(BaseNetwork.source == "shipped").order_by(BaseNetwork.id.desc())
        )
        if newest is None:
            raise Problem(422, "no shipped base model is registered", slug="no-base-model")
        return newest
    name = choice.split(":", 1)[1]
    row = session.scalar(select(BaseNetwork).where(BaseNetwork.name == name))
    if row is None:
        names = ", ".join(session.scalars(select(BaseNetwork.name)).all()) or "none registered"
        raise Problem(422, f"no base model named {name!r} (available: {names})", slug="unknown-base-model")
    return row


def _resolve_base(session: Session, base: str) -> str:
    """A fine-tune's base: 'version:<id>' of the zoo, a registered base model, or '' for the shipped one."""
    if base.startswith("version:"):
        number = base.split(":", 1)[1].strip()
        if not number.isdigit() or not 1 <= int(number) <= MAX_ID:
            raise Problem(422, "base 'version:<id>' needs a model version number", slug="bad-base")
        zoo.model_version_by_id(session, int(number))
        return base
    if base:
        return zoo.base_model_by_name(session, base).name
    from sqlalchemy import select

    from app.models import BaseNetwork

    shipped = session.scalar(select(BaseNetwork).where(BaseNetwork.source == "shipped").order_by(BaseNetwork.id))
    if shipped is None:
        raise Problem(422, "no base model is registered; upload one or name one in 'base'", slug="no-base-model")
    return shipped.name


def _check_channel(ds: Dataset, name: str | None, what: str) -> None:
    if name is not None and name not in ds.channels:
        raise Problem(
            422,
            f"{what} {name!r} is not a channel of dataset {ds.id} (it has {', '.join(ds.channels)})",
            slug="unknown-channel",
        )


@router.post(
    "/pretrain-isl",
    response_model=JobOut,
    status_code=202,
    summary="In-silico-labelling pretraining: a base model that predicts a stain from other channels",
)
def submit_pretrain_isl(
    body: PretrainISLIn,
    session: SessionDep,
    settings: SettingsDep,
    principal: ScientistDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    from sqlalchemy import select

    from app.models import BaseNetwork

    ds = zoo.dataset_by_id(session, body.dataset_id)
    for name in body.source_channels:
        _check_channel(ds, name, "source channel")
    _check_channel(ds, body.target_channel, "target channel")
    if body.target_channel in body.source_channels:
        raise Problem(422, "the target stain cannot also be a source channel", slug="target-is-source")
    if len(set(body.source_channels)) != len(body.source_channels):
        raise Problem(422, "source_channels lists a channel twice", slug="duplicate-channels")
    if len(ds.images) < 2:
        raise Problem(
            422,
            f"dataset {ds.id} has {len(ds.images)} image(s); ISL pretraining needs at least 2 "
            "(training and validation)",
            slug="too-few-images",
        )
    if session.scalar(select(BaseNetwork).where(BaseNetwork.name == body.name)) is not None:
        raise Problem(
            409, f"a base model named {body.name!r} already exists; choose another name", slug="base-model-exists"
        )
    init = zoo.base_model_by_name(session, body.init_base).name if body.init_base else None
    params = PretrainISLJob(
        dataset_id=ds.id,
        source_channels=body.source_channels,
        target_channel=body.target_channel,
        name=body.name,
        init_base=init,
        params=body.params,
    )
    return _accepted(session, settings, "pretrain_isl", params, principal, idempotency_key, response)


@router.post(
    "/self-train",
    response_model=JobOut,
    status_code=202,
    summary="Annotation-free training: pseudo-labels from nucleus markers, then a fine-tune",
)
def submit_self_train(
    body: SelfTrainIn,
    session: SessionDep,
    settings: SettingsDep,
    principal: ScientistDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    ds = zoo.dataset_by_id(session, body.dataset_id)
    _check_channel(ds, body.reporter, "reporter")
    zoo.reporter_by_name(session, body.reporter)
    if (body.marker_channel is None) == (body.marker_isl_model is None):
        raise Problem(
            422,
            "give exactly one marker source: marker_channel (a nuclear stain channel) or "
            "marker_isl_model (an ISL base model that predicts it)",
            slug="marker-source",
        )
    _check_channel(ds, body.marker_channel, "marker channel")
    source = body.marker_source_channel or (body.reporter if body.marker_isl_model else None)
    _check_channel(ds, source, "marker source channel")
    if body.marker_isl_model is not None:
        isl = zoo.base_model_by_name(session, body.marker_isl_model)
        if (isl.card or {}).get("training", {}).get("pretext") != "in-silico labelling":
            raise Problem(
                422,
                f"base model {isl.name!r} is not an ISL model (made by a pretrain-isl job)",
                slug="not-an-isl-model",
            )
    foreground = body.foreground_channel or (
        body.marker_channel or source if body.object == "nuclei" else body.reporter
    )
    _check_channel(ds, foreground, "foreground channel")
    if len(ds.images) < 3:
        raise Problem(
            422,
            f"dataset {ds.id} has {len(ds.images)} image(s); self-training needs at least 3 "
            "(training, validation, test)",
            slug="too-few-images",
        )
    params = SelfTrainJob(
        dataset_id=ds.id,
        reporter=body.reporter,
        object=body.object,
        cell_line=ds.cell_line.name,
        base=_resolve_base(session, body.base),
        marker_channel=body.marker_channel,
        marker_isl_model=body.marker_isl_model,
        marker_source_channel=source,
        foreground_channel=foreground,
        self_train=body.self_train,
        params=body.params,
    )
    return _accepted(session, settings, "self_train", params, principal, idempotency_key, response)


def check_preprocessing(
    session: Session,
    plan: dict[str, ObjectPlan],
    override: PreprocessingRecipe | None,
    n_fields: int,
    shapes: set[tuple[int, int]],
) -> None:
    """Refuse, before the job exists, what preprocessing could not do on this plate: a stored
    profile of the wrong size or without the channel, or a plate too small to estimate a profile on
    (unless the model has a training profile of the right size to fall back on)."""
    from app.science.preprocessing import MIN_PROFILE_FIELDS

    for obj, object_plan in plan.items():
        for name, version_id in object_plan.models.items():
            card = session.get(ModelVersion, version_id).card
            recipe = override or recipe_from_card(card)
            if recipe.illumination == "profile":
                _check_profile(session, recipe.profile_id, name, shapes)
            elif recipe.illumination == "per-plate" and n_fields < MIN_PROFILE_FIELDS:
                trained = None if override else training_profile_from_card(card)
                if trained is None or _profile_shape(session, trained.get("id")) not in shapes or len(shapes) != 1:
                    whose = "the request's recipe" if override else f"the {obj} model of {name!r}"
                    raise Problem(
                        422,
                        f"{whose} corrects illumination per plate, but the plate has {n_fields} "
                        f"field(s); at least {MIN_PROFILE_FIELDS} are needed to estimate a profile. Send "
                        "more fields, or upload a flat-field and use preprocessing.illumination='profile'",
                        slug="plate-too-small-for-profile",
                        fields=n_fields,
                        minimum=MIN_PROFILE_FIELDS,
                    )


def _profile_shape(session: Session, profile_id: int | None) -> tuple[int, int] | None:
    row = session.get(IlluminationProfile, profile_id) if profile_id else None
    return None if row is None else (row.height, row.width)


def _check_profile(session: Session, profile_id: int | None, channel: str, shapes: set[tuple[int, int]]) -> None:
    row = session.get(IlluminationProfile, profile_id) if profile_id else None
    if row is None:
        raise Problem(422, f"there is no illumination profile {profile_id}", slug="unknown-profile")
    if channel not in row.channels:
        raise Problem(
            422,
            f"illumination profile {row.id} has no channel {channel!r} (it has {', '.join(row.channels)})",
            slug="profile-channel-mismatch",
        )
    wrong = sorted(s for s in shapes if s != (row.height, row.width))
    if wrong:
        raise Problem(
            422,
            f"illumination profile {row.id} is {row.height}×{row.width} but the fields are "
            f"{', '.join(f'{h}×{w}' for h, w in wrong)}: a profile corrects fields of its own size",
            slug="profile-shape-mismatch",
        )


@router.post(
    "/finetune",
    response_model=JobOut,
    status_code=202,
    summary="Fine-tune a model for one (cell line, reporter, object) on a dataset",
)
def submit_finetune(
    body: FinetuneIn,
    session: SessionDep,
    settings: SettingsDep,
    principal: ScientistDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    max_epochs = settings.max_finetune_epochs.get(principal.role, 0)
    if body.params.max_epochs > max_epochs:
        raise Problem(
            422,
            f"a {principal.role} key may fine-tune for at most {max_epochs} epochs "
            f"(max_epochs {body.params.max_epochs})",
            slug="job-too-long",
            limit_epochs=max_epochs,
        )
    ds = zoo.dataset_by_id(session, body.dataset_id)
    if body.reporter not in ds.channels:
        raise Problem(
            422,
            f"dataset {ds.id} has no channel {body.reporter!r} (it has {', '.join(ds.channels)})",
            slug="unknown-channel",
        )
    mask_attr = "nuclei_sha256" if body.object == "nuclei" else "cells_sha256"
    labelled = sum(1 for im in ds.images if getattr(im, mask_attr))
    if labelled < 3:
        raise Problem(
            422,
            f"dataset {ds.id} has {labelled} image(s) with {body.object} masks; fine-tuning "
            "needs at least 3 (training, validation, test)",
            slug="too-few-labelled-images",
        )
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

        from app.models import BaseNetwork

        shipped = session.scalar(select(BaseNetwork).where(BaseNetwork.source == "shipped").order_by(BaseNetwork.id))
        if shipped is None:
            raise Problem(422, "no base model is registered; upload one or name one in 'base'", slug="no-base-model")
        base = shipped.name
    recipe = body.params.preprocessing
    shapes = {(im.height, im.width) for im in ds.images}
    if recipe.illumination == "profile":
        _check_profile(session, recipe.profile_id, body.reporter, shapes)
    if recipe.illumination == "per-plate":
        from app.science.preprocessing import MIN_PROFILE_FIELDS

        if len(ds.images) < MIN_PROFILE_FIELDS or len(shapes) != 1:
            raise Problem(
                422,
                f"per-plate illumination correction estimates a profile from the dataset's images: it "
                f"needs at least {MIN_PROFILE_FIELDS} images of one size; dataset {ds.id} has "
                f"{len(ds.images)} image(s) of {len(shapes)} size(s)",
                slug="plate-too-small-for-profile",
            )
    params = FinetuneJob(
        dataset_id=ds.id,
        reporter=body.reporter,
        object=body.object,
        base=base,
        cell_line=ds.cell_line.name,
        params=body.params,
    )
    return _accepted(session, settings, "finetune", params, principal, idempotency_key, response)


@router.post(
    "/segment",
    response_model=JobOut,
    status_code=202,
    summary="Segment uploaded fields (a plate: one file per field) with Flow Fusion or a baseline",
)
def submit_segment(
    session: SessionDep,
    settings: SettingsDep,
    blobs: BlobsDep,
    principal: InstrumentDep,
    response: Response,
    request: Annotated[str, Form(description="JSON: SegmentRequest", max_length=200_000)],
    files: Annotated[list[UploadFile], File(description="one TIFF/OME-TIFF per field")],
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    try:
        req = SegmentRequest.model_validate_json(request)
    except ValidationError as exc:
        errors = [{"location": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in exc.errors()]
        raise Problem(
            422,
            "the segmentation request is not valid: "
            + "; ".join(f"{e['location']}: {e['message']}" for e in errors[:5]),
            slug="validation-error",
            errors=errors,
        )
    if req.fields and len(req.fields) != len(files):
        raise Problem(
            422,
            f"'fields' describes {len(req.fields)} field(s) but {len(files)} file(s) were sent",
            slug="fields-mismatch",
        )
    names = _uploaded_field_names(req, len(files))
    shapes: list = []
    line = zoo.cell_line_by_name(session, req.cell_line)
    # A fused channel must be one of the image's (a 422 naming it); a channel that is not fused (e.g.
    # brightfield) is only carried along: it need not be a registered reporter.
    _check_subset(req.use_channels, req.channels)
    for name in req.channels if req.use_channels is None else req.use_channels:
        if (req.models or {}).get(name, req.model) == "zoo":  # a base model needs no registered reporter
            zoo.reporter_by_name(session, name)
    if len(set(req.channels)) != len(req.channels):
        raise Problem(422, "each channel needs its own name; the request lists one twice", slug="duplicate-channels")
    plan = plan_request_models(session, line, req.channels, list(req.objects), req)
    loaded = []
    for index, upload in enumerate(files):
        # Validated from its spooled file; only one field's pixels are in memory at a time.
        image = load_image([upload], settings.max_upload_bytes, settings.max_image_pixels)
        (n_channels, *field_shape), image.data = image.data.shape, None
        if n_channels != len(req.channels):
            raise Problem(
                422,
                f"{image.filename} has {n_channels} channel(s) but the request maps "
                f"{len(req.channels)} ({', '.join(req.channels)})",
                slug="channel-count-mismatch",
            )
        meta = req.fields[index] if req.fields else None
        shapes.append(tuple(field_shape))
        loaded.append(
            (
                image,
                {
                    "name": names[index],
                    "well": meta.well if meta else None,
                    "field": meta.field if meta else None,
                    "diameter": meta.diameter if meta else None,
                    "filename": image.filename,
                },
            )
        )
    check_preprocessing(session, plan, req.params.preprocessing, len(files), set(shapes))
    # All files are valid: only now store them (streamed from the spooled files).
    fields = [FieldSpec(image_sha256=image.store(blobs).sha256, **meta) for image, meta in loaded]
    params = SegmentJob(
        cell_line=line.name,
        channels=req.channels,
        objects=list(req.objects),
        method=req.method,
        alias=req.alias,
        plate=req.plate,
        plan=plan,
        fields=fields,
        params=req.params,
    )
    return _accepted(session, settings, "segment", params, principal, idempotency_key, response)


def _safe_part(text: str) -> str:
    """A file-name-safe form of a well, field or plate name (kept whole: no truncation)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text.strip()).strip(".") or "_"


def field_name(well: str, field: int | None, plate: str | None = None) -> str:
    """The name a field's results go under: ``[plate_]well-field``.

    >>> field_name("A01", 0), field_name("B 12", 3, plate="P1"), field_name("A01", None)
    ('A01-0', 'P1_B_12-3', 'A01')
    """
    name = _safe_part(well) if field is None else f"{_safe_part(well)}-{field}"
    return f"{_safe_part(plate)}_{name}" if plate else name


def _uploaded_field_names(req: SegmentRequest, n_files: int) -> list[str]:
    """One distinct result name per uploaded file; a plate that names one field twice is refused.

    Fields without metadata are numbered by upload order (F001, F002, ...).
    """
    if not req.fields:
        return [f"F{i + 1:03d}" for i in range(n_files)]
    keys = [(meta.well or f"F{i + 1:03d}", meta.field) for i, meta in enumerate(req.fields)]
    seen: dict[tuple[str, int | None], int] = {}
    duplicates = []
    for i, key in enumerate(keys):
        if key in seen:
            duplicates.append(f"well {key[0]!r} field {key[1]} (files {seen[key] + 1} and {i + 1})")
        seen.setdefault(key, i)
    if duplicates:
        raise Problem(
            422,
            "the plate names the same field more than once: "
            + "; ".join(duplicates)
            + "; give every file its own {well, field}",
            slug="duplicate-fields",
            duplicates=duplicates,
        )
    names = [field_name(well, field) for well, field in keys]
    _refuse_name_collisions(names, [f"well {w!r} field {f}" for w, f in keys])
    return names


def _refuse_name_collisions(names: list[str], described: list[str]) -> None:
    by_name: dict[str, list[str]] = {}
    for name, what in zip(names, described, strict=True):
        by_name.setdefault(name, []).append(what)
    clashes = {name: whats for name, whats in by_name.items() if len(whats) > 1}
    if clashes:
        detail = "; ".join(f"{' and '.join(whats)} would both be stored as {name!r}" for name, whats in clashes.items())
        raise Problem(
            422,
            f"field names clash after making them safe for file names: {detail}; rename the wells",
            slug="duplicate-fields",
            duplicates=list(clashes),
        )


@router.post(
    "/segment-dataset",
    response_model=JobOut,
    status_code=202,
    summary="Segment the images of a dataset (with metrics against its masks)",
)
def submit_segment_dataset(
    body: SegmentDatasetIn,
    session: SessionDep,
    settings: SettingsDep,
    principal: ScientistDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    ds = zoo.dataset_by_id(session, body.dataset_id)
    plan = plan_request_models(session, ds.cell_line, ds.channels, list(body.objects), body)
    images = [im for im in ds.images if body.split is None or im.split == body.split]
    if not images:
        raise Problem(422, f"dataset {ds.id} has no images in split {body.split!r}", slug="empty-split")
    # The recipe is fitted on the whole dataset (as the fine-tune and evaluate fit it), not on the split.
    check_preprocessing(
        session, plan, body.params.preprocessing, len(ds.images), {(im.height, im.width) for im in ds.images}
    )
    fields = [
        FieldSpec(
            name=name,
            well=im.well,
            field=im.field,
            filename=im.filename,
            image_sha256=im.image_sha256,
            dataset_image_id=im.id,
        )
        for name, im in zip(_dataset_field_names(images), images, strict=True)
    ]
    params = SegmentJob(
        cell_line=ds.cell_line.name,
        channels=ds.channels,
        objects=list(body.objects),
        method=body.method,
        alias=body.alias,
        plan=plan,
        fields=fields,
        dataset_id=ds.id,
        params=body.params,
    )
    return _accepted(session, settings, "segment", params, principal, idempotency_key, response)


def _dataset_field_names(images: list) -> list[str]:
    """Distinct names for a dataset's images: ``[plate_]well-field``, or ``image-<id>`` without a well;
    an image whose name another image already took gets its id appended (datasets may hold repeats)."""
    names, taken = [], set()
    for im in images:
        name = field_name(im.well, im.field, im.plate) if im.well else f"image-{im.id}"
        if name in taken:
            name = f"{name}-image-{im.id}"
        taken.add(name)
        names.append(name)
    return names


@router.post(
    "/evaluate",
    response_model=JobOut,
    status_code=202,
    summary="Evaluate a model version, or a fusion setting, on a labelled dataset",
)
def submit_evaluate(
    body: EvaluateIn,
    session: SessionDep,
    settings: SettingsDep,
    principal: ScientistDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    ds: Dataset = zoo.dataset_by_id(session, body.dataset_id)
    params: EvaluateJob
    if body.model_version_id is not None:
        version = zoo.model_version_by_id(session, body.model_version_id)
        if version.status not in ("ready", "archived"):
            raise Problem(409, f"model version {version.id} is {version.status}", slug="version-not-ready")
        if version.reporter.name not in ds.channels:
            raise Problem(
                422, f"dataset {ds.id} has no channel for reporter {version.reporter.name!r}", slug="unknown-channel"
            )
        params = EvaluateJob(
            dataset_id=ds.id,
            split=body.split,
            model_version_id=version.id,
            object=version.object,
            reporter=version.reporter.name,
        )
    else:
        if body.object is None:
            raise Problem(
                422,
                "give either model_version_id, or object (with optional use_channels, method and model)",
                slug="evaluate-target-missing",
            )
        plan = plan_request_models(session, ds.cell_line, ds.channels, [body.object], body)
        params = EvaluateJob(
            dataset_id=ds.id, split=body.split, object=body.object, method=body.method, plan=plan, params=body.params
        )
    _check_split_labelled(ds, body.split, params.object)
    return _accepted(session, settings, "evaluate", params, principal, idempotency_key, response)


def _check_split_labelled(ds: Dataset, split: str, obj: str) -> None:
    attr = "nuclei_sha256" if obj == "nuclei" else "cells_sha256"
    if not any(im.split == split and getattr(im, attr) for im in ds.images):
        raise Problem(
            422,
            f"dataset {ds.id} has no {obj}-labelled images in split {split!r}; "
            "assign splits when uploading or run a fine-tune first",
            slug="empty-split",
        )


@router.post(
    "/select-channels",
    response_model=JobOut,
    status_code=202,
    summary="Rank every channel subset for a (cell line, object) and store the best",
)
def submit_select_channels(
    body: SelectChannelsIn,
    session: SessionDep,
    settings: SettingsDep,
    principal: ScientistDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    ds = zoo.dataset_by_id(session, body.dataset_id)
    plan = plan_models(
        session, ds.cell_line, ds.channels, [body.object], list(ds.channels), body.alias, learned_fusion=False
    )
    _check_split_labelled(ds, body.split, body.object)
    params = SelectChannelsJob(**body.model_dump(), plan=plan, cell_line=ds.cell_line.name)
    return _accepted(session, settings, "select_channels", params, principal, idempotency_key, response)
