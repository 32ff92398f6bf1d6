"""The model zoo: cell lines, reporters, base models, model versions, aliases, channel sets."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app import zoo
from app.api.deps import (
    AdminDep,
    BlobsDep,
    IdPath,
    InstrumentDep,
    PageDep,
    ScientistDep,
    SessionDep,
    SettingsDep,
)
from app.api.errors import Problem
from app.api.schemas import (
    NAME_PATTERN,
    AliasIn,
    AliasOut,
    BaseModelOut,
    CellLineIn,
    CellLineOut,
    ChannelSetIn,
    ChannelSetOut,
    FusionParametersOut,
    ModelVersionOut,
    ObjectLiteral,
    ReporterIn,
    ReporterOut,
    ResolutionOut,
)
from app.api.uploads import read_upload
from app.models import (
    AliasMove,
    BaseNetwork,
    CellLine,
    ChannelSet,
    ModelAlias,
    ModelVersion,
    Reporter,
)
from app.vocabulary import DEFAULT_ALIAS

router = APIRouter(prefix="/api/v1", tags=["zoo"])


def _create(session, row, what: str):
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Problem(409, f"a {what} named {row.name!r} exists already", slug=f"{what.replace(' ', '-')}-exists")
    session.refresh(row)
    return row


@router.post("/cell-lines", response_model=CellLineOut, status_code=201, summary="Register a cell line")
def create_cell_line(body: CellLineIn, session: SessionDep, _: ScientistDep) -> CellLine:
    return _create(session, CellLine(**body.model_dump()), "cell line")


@router.get("/cell-lines", response_model=list[CellLineOut], summary="List cell lines (paged)")
def list_cell_lines(session: SessionDep, _: InstrumentDep, page: PageDep, response: Response) -> list[CellLine]:
    return page.rows(session, select(CellLine).order_by(CellLine.name), response)


@router.post("/reporters", response_model=ReporterOut, status_code=201, summary="Register a reporter")
def create_reporter(body: ReporterIn, session: SessionDep, _: ScientistDep) -> Reporter:
    return _create(session, Reporter(**body.model_dump()), "reporter")


@router.get("/reporters", response_model=list[ReporterOut], summary="List reporters (paged)")
def list_reporters(session: SessionDep, _: InstrumentDep, page: PageDep, response: Response) -> list[Reporter]:
    return page.rows(session, select(Reporter).order_by(Reporter.name), response)


@router.get("/base-models", response_model=list[BaseModelOut], summary="Models fine-tuning can start from (paged)")
def list_base_models(session: SessionDep, _: InstrumentDep, page: PageDep, response: Response) -> list[BaseNetwork]:
    return page.rows(session, select(BaseNetwork).order_by(BaseNetwork.name), response)


@router.post(
    "/base-models",
    response_model=BaseModelOut,
    status_code=201,
    summary="Upload a base model (safetensors CPnet weights); stored by sha256",
)
def upload_base_model(
    session: SessionDep,
    settings: SettingsDep,
    blobs: BlobsDep,
    _: AdminDep,
    name: Annotated[str, Form(pattern=NAME_PATTERN)],
    weights: Annotated[UploadFile, File(description="a .safetensors CPnet state dict")],
    diam_mean: Annotated[float, Form(gt=0, le=500)] = 30.0,
    diameter: Annotated[float | None, Form(gt=0, le=500)] = None,
) -> BaseNetwork:
    from models_zoo.registry import check_cpnet_safetensors

    data = read_upload(weights, settings.max_upload_bytes)
    try:
        header = check_cpnet_safetensors(data)
    except ValueError as exc:
        raise Problem(422, f"{exc}. Convert Cellpose .pth files with `cellfuse` tools first.", slug="invalid-weights")
    if session.scalar(select(BaseNetwork).where(BaseNetwork.name == name)) is not None:
        raise Problem(409, f"a base model named {name!r} exists already", slug="base-model-exists")
    widths = _header_widths(header)
    if not widths:
        raise Problem(
            422,
            "the weights hold no CPnet encoder tensors (downsample.down.res_down_*); upload a Cellpose 3 network",
            slug="invalid-weights",
        )
    stored = blobs.put_bytes(data)
    # The widths go on the card: a pipeline builds the network from the card before loading weights.
    card = {
        "name": name,
        "version": "upload",
        "diam_mean": diam_mean,
        "diameter": diameter or diam_mean,
        "format": "safetensors",
        "tensors": len([k for k in header if k != "__metadata__"]),
        "widths": widths,
    }
    return _create(
        session, BaseNetwork(name=name, source="upload", weights_sha256=stored.sha256, card=card), "base model"
    )


def _header_widths(header: dict) -> list[int]:
    """CPnet widths from the safetensors header (the 1x1 projection of each encoder level)."""
    widths: list[int] = []
    while isinstance(info := header.get(f"downsample.down.res_down_{len(widths)}.proj.1.weight"), dict):
        shape = info.get("shape") or [0]
        if not isinstance(shape[0], int) or shape[0] <= 0:
            return []
        widths.append(shape[0])
    return widths


def version_out(session, v: ModelVersion) -> ModelVersionOut:
    aliases = list(session.scalars(select(ModelAlias.alias).where(ModelAlias.model_version_id == v.id)))
    base = session.get(BaseNetwork, v.base_model_id) if v.base_model_id else None
    return ModelVersionOut(
        id=v.id,
        cell_line=v.cell_line.name,
        reporter=v.reporter.name,
        object=v.object,
        version=v.version,
        status=v.status,
        base_model=base.name if base else None,
        parent_version_id=v.parent_version_id,
        dataset_id=v.dataset_id,
        job_id=v.job_id,
        training_params=v.training_params or {},
        weights_sha256=v.weights_sha256,
        diameter=v.diameter,
        test_metrics=v.test_metrics or {},
        training_curve=v.training_curve or [],
        card=v.card or {},
        aliases=aliases,
        pseudo_labelled=bool(v.pseudo_labelled),
        created_at=v.created_at,
    )


@router.get("/models", response_model=list[ModelVersionOut], summary="Model versions, filtered (paged)")
def list_model_versions(
    session: SessionDep,
    _: InstrumentDep,
    page: PageDep,
    response: Response,
    cell_line: Annotated[str | None, Query(max_length=120)] = None,
    reporter: Annotated[str | None, Query(max_length=120)] = None,
    object: Annotated[ObjectLiteral | None, Query()] = None,
    status: Annotated[str | None, Query(max_length=12)] = None,
) -> list[ModelVersionOut]:
    stmt = select(ModelVersion)
    if cell_line:
        stmt = stmt.where(ModelVersion.cell_line_id == zoo.cell_line_by_name(session, cell_line).id)
    if reporter:
        stmt = stmt.where(ModelVersion.reporter_id == zoo.reporter_by_name(session, reporter).id)
    if object:
        stmt = stmt.where(ModelVersion.object == object)
    if status:
        stmt = stmt.where(ModelVersion.status == status)
    return [version_out(session, v) for v in page.rows(session, stmt.order_by(ModelVersion.id.desc()), response)]


@router.get("/models/{version_id}", response_model=ModelVersionOut, summary="One model version")
def get_model_version(version_id: IdPath, session: SessionDep, _: InstrumentDep) -> ModelVersionOut:
    return version_out(session, zoo.model_version_by_id(session, version_id))


#: Cellpose 3's classes hard-code these CPnet widths; only such nets get a Cellpose-format file.
CELLPOSE_FULL_WIDTHS = [32, 64, 128, 256]


def _weights_stem(version: ModelVersion) -> str:
    return f"{version.cell_line.name}-{version.reporter.name}-{version.object}-v{version.version}"


@router.get(
    "/models/{version_id}/weights",
    summary="Download a model version's weights",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}, "application/octet-stream": {}, "application/json": {}}}},
)
def download_weights(
    version_id: IdPath,
    session: SessionDep,
    blobs: BlobsDep,
    _: ScientistDep,
    format: Annotated[
        Literal["zip", "safetensors", "card", "cellpose"],
        Query(
            description="zip: safetensors + card.json + README; cellpose: Cellpose 3's own "
            "state-dict file (full-width models only)"
        ),
    ] = "zip",
) -> Response:
    """The weights as scientists use them elsewhere: the safetensors file with its card (sha256 inside),
    or the Cellpose 3 file that ``CellposeModel(pretrained_model=...)`` loads."""
    version = zoo.model_version_by_id(session, version_id)
    if version.status not in ("ready", "archived") or not version.weights_sha256:
        raise Problem(
            409, f"model version {version_id} has no weights yet (status {version.status!r})", slug="weights-not-ready"
        )
    stem = _weights_stem(version)
    card = dict(version.card or {})
    headers = {"X-Content-SHA256": version.weights_sha256}
    if format == "card":
        return Response(
            json.dumps(card, indent=2, sort_keys=True),
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{stem}.json"'},
        )
    if format == "cellpose":
        widths = list((card.get("architecture") or {}).get("widths") or card.get("widths") or [])
        if widths != CELLPOSE_FULL_WIDTHS:
            raise Problem(
                409,
                f"model version {version_id} is a CPnet of widths {widths}; Cellpose 3 loads only "
                f"full-width nets {CELLPOSE_FULL_WIDTHS}. Download format=zip (safetensors) instead.",
                slug="not-cellpose-compatible",
            )
        cellpose_sha = (card.get("extra") or {}).get("cellpose_weights_sha256")
        if not cellpose_sha or not blobs.exists(cellpose_sha):
            raise Problem(
                409,
                f"model version {version_id} has no Cellpose export stored (it was trained before "
                "exports were written); download format=zip (safetensors) instead",
                slug="no-cellpose-export",
            )
        return Response(
            blobs.read_bytes(cellpose_sha),
            media_type="application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{stem}"', "X-Content-SHA256": cellpose_sha},
        )
    try:
        weights = blobs.read_bytes(version.weights_sha256)
    except KeyError:
        raise Problem(
            410,
            f"the weights file of model version {version_id} is missing from the data directory",
            slug="weights-gone",
        )
    if format == "safetensors":
        return Response(
            weights,
            media_type="application/octet-stream",
            headers={**headers, "Content-Disposition": f'attachment; filename="{stem}.safetensors"'},
        )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{stem}.safetensors", weights)
        archive.writestr(f"{stem}.json", json.dumps(card, indent=2, sort_keys=True))
        archive.writestr("README.txt", _weights_readme(stem, version))
    return Response(
        buffer.getvalue(),
        media_type="application/zip",
        headers={**headers, "Content-Disposition": f'attachment; filename="{stem}.zip"'},
    )


def _weights_readme(stem: str, version: ModelVersion) -> str:
    return (
        f"CellFuse model version {version.id}: {version.cell_line.name} / {version.reporter.name} / "
        f"{version.object}, version {version.version}\n"
        f"weights sha256: {version.weights_sha256}\n"
        f"diameter to use at inference: {version.diameter}\n\n"
        "Load in Python (the card rebuilds the network and checks the sha256):\n"
        "    from app.science.weights import load_model\n"
        f"    net, card = load_model('{stem}.safetensors')  # reads {stem}.json beside it\n"
    )


@router.post("/models/{version_id}/archive", response_model=ModelVersionOut, summary="Archive a version")
def archive_model_version(version_id: IdPath, session: SessionDep, _: AdminDep) -> ModelVersionOut:
    version = zoo.model_version_by_id(session, version_id)
    if session.scalar(select(ModelAlias).where(ModelAlias.model_version_id == version.id)) is not None:
        raise Problem(409, f"version {version_id} holds an alias; move the alias first", slug="version-holds-alias")
    if version.status == "ready":
        version.status = "archived"
        session.commit()
    return version_out(session, version)


def alias_out(session, row: ModelAlias) -> AliasOut:
    moves = session.scalars(select(AliasMove).where(AliasMove.alias_id == row.id).order_by(AliasMove.id)).all()
    return AliasOut(
        cell_line=session.get(CellLine, row.cell_line_id).name,
        reporter=session.get(Reporter, row.reporter_id).name,
        object=row.object,
        alias=row.alias,
        version_id=row.model_version_id,
        version=row.model_version.version,
        history=[
            {
                "from_version_id": m.from_version_id,
                "to_version_id": m.to_version_id,
                "forced": m.forced,
                "reason": m.reason,
                "at": m.created_at.isoformat(),
            }
            for m in moves
        ],
    )


@router.get("/aliases", response_model=list[AliasOut], summary="Aliases with their history (paged)")
def list_aliases(
    session: SessionDep,
    _: InstrumentDep,
    page: PageDep,
    response: Response,
    cell_line: Annotated[str | None, Query(max_length=120)] = None,
) -> list[AliasOut]:
    stmt = select(ModelAlias)
    if cell_line:
        stmt = stmt.where(ModelAlias.cell_line_id == zoo.cell_line_by_name(session, cell_line).id)
    return [alias_out(session, row) for row in page.rows(session, stmt.order_by(ModelAlias.id), response)]


@router.put(
    "/aliases/{cell_line}/{reporter}/{object}/{alias}",
    response_model=AliasOut,
    summary="Move an alias; refused for a worse model on the same test set unless forced",
)
def move_alias(
    cell_line: str,
    reporter: str,
    object: ObjectLiteral,
    alias: str,
    body: AliasIn,
    session: SessionDep,
    principal: AdminDep,
) -> AliasOut:
    if not alias.replace("-", "").replace("_", "").isalnum() or len(alias) > 60:
        raise Problem(422, "an alias is letters, digits, '-' and '_' (at most 60)", slug="bad-alias")
    row = zoo.move_alias(
        session,
        zoo.cell_line_by_name(session, cell_line),
        zoo.reporter_by_name(session, reporter),
        object,
        alias,
        zoo.model_version_by_id(session, body.version_id),
        force=body.force,
        reason=body.reason,
        actor_key_id=principal.key_id,
    )
    return alias_out(session, row)


def channel_set_out(session, row: ChannelSet) -> ChannelSetOut:
    chosen_row = next((r for r in row.ranking or [] if sorted(r.get("channels", [])) == sorted(row.chosen)), None)
    return ChannelSetOut(
        cell_line=session.get(CellLine, row.cell_line_id).name,
        object=row.object,
        method=row.method,
        chosen=row.chosen,
        ranking=row.ranking,
        dataset_id=row.dataset_id,
        job_id=row.job_id,
        chosen_f1_interval=(chosen_row or {}).get("f1_interval"),
        fusion_parameters=(
            FusionParametersOut.model_validate(row.fusion_parameters) if row.fusion_parameters else None
        ),
    )


@router.get("/channel-sets", response_model=list[ChannelSetOut], summary="Chosen channel sets and rankings (paged)")
def list_channel_sets(
    session: SessionDep,
    _: InstrumentDep,
    page: PageDep,
    response: Response,
    cell_line: Annotated[str | None, Query(max_length=120)] = None,
) -> list[ChannelSetOut]:
    stmt = select(ChannelSet)
    if cell_line:
        stmt = stmt.where(ChannelSet.cell_line_id == zoo.cell_line_by_name(session, cell_line).id)
    return [channel_set_out(session, r) for r in page.rows(session, stmt.order_by(ChannelSet.id.desc()), response)]


@router.put(
    "/channel-sets/{cell_line}/{object}",
    response_model=ChannelSetOut,
    summary="Choose the channel set for a (cell line, object) by hand",
)
def choose_channel_set(
    cell_line: str, object: ObjectLiteral, body: ChannelSetIn, session: SessionDep, _: AdminDep
) -> ChannelSetOut:
    line = zoo.cell_line_by_name(session, cell_line)
    for name in body.channels:
        zoo.reporter_by_name(session, name)
    previous = zoo.chosen_channels(session, line.id, object)
    row = ChannelSet(
        cell_line_id=line.id,
        object=object,
        method=body.method,
        chosen=body.channels,
        ranking=previous.ranking if previous else [],
        dataset_id=None,
        job_id=None,
    )
    session.add(row)
    session.commit()
    return channel_set_out(session, row)


@router.get(
    "/resolve",
    response_model=ResolutionOut,
    summary="The model version per channel for a cell line; channels with none are reported",
)
def resolve(
    session: SessionDep,
    _: InstrumentDep,
    cell_line: Annotated[str, Query(max_length=120)],
    channels: Annotated[str, Query(max_length=1000, description="comma-separated reporter names")],
    object: Annotated[ObjectLiteral, Query()] = "nuclei",
    alias: Annotated[str, Query(max_length=60)] = DEFAULT_ALIAS,
) -> ResolutionOut:
    line = zoo.cell_line_by_name(session, cell_line)
    names = [c.strip() for c in channels.split(",") if c.strip()]
    if not names:
        raise Problem(422, "give at least one channel (reporter name)", slug="no-channels")
    res = zoo.resolve_models(session, line, names, object, alias)
    return ResolutionOut(
        cell_line=line.name,
        object=object,
        alias=alias,
        models={
            k: {"version_id": v.id, "version": v.version, "weights_sha256": v.weights_sha256, "how": res.how[k]}
            for k, v in res.models.items()
        },
        missing=res.missing,
    )
