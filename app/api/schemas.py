"""Request and response bodies. Strict where the client sends data: unknown fields are refused."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.job_params import (
    Diameter,
    FinetuneParams,
    ISLParams,
    NoopJob,
    SegmentParams,
    SelfTrainParams,
    StrictModel,
)
from app.vocabulary import (
    DEFAULT_ALIAS,
    JobStatusLiteral,
    MethodLiteral,
    MetricLiteral,
    ObjectLiteral,
    RoleLiteral,
    SplitLiteral,
)

#: Row ids are 32-bit in PostgreSQL; a larger number can name nothing (and must not reach the driver).
MAX_ID = 2**31 - 1
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._+()/-]{0,119}$"
#: Which model segments a channel: "zoo" (the cell line's fine-tuned version, the default), "base"
#: (the newest shipped base, zero-shot), "base:<name>" (a registered base) or "version:<id>".
ModelChoice = Annotated[
    str,
    Field(
        pattern=r"^(zoo|base|base:[A-Za-z0-9][A-Za-z0-9 ._+()/:-]{0,119}|version:[0-9]{1,10})$",
        examples=["zoo", "base", "base:cellfuse-base-w16:v3", "version:12"],
    ),
]
MODEL_DESCRIPTION = (
    "model for every fused channel: 'zoo' (default), 'base' (the shipped base, zero-shot), "
    "'base:<name>' or 'version:<id>'"
)


@overload
def as_utc(value: datetime) -> datetime: ...
@overload
def as_utc(value: None) -> None: ...
@overload
def as_utc(value: datetime | None) -> datetime | None: ...
def as_utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every timestamp CellFuse stores is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


class ResultOut(BaseModel):
    name: str
    kind: str
    media_type: str
    size_bytes: int
    sha256: str
    meta: dict[str, Any] = {}
    url: str


class JobOut(BaseModel):
    id: str
    kind: str
    status: JobStatusLiteral
    stage: str
    progress: float
    error: str | None
    params: dict[str, Any]
    summary: dict[str, Any]
    attempts: int
    max_attempts: int
    worker: str | None
    cancel_requested: bool
    stage_timings: dict[str, float]
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    results: list[ResultOut] = []
    partial_results: bool = Field(
        default=False,
        description="the job was cancelled or failed after producing these results: they cover only part of the work",
    )

    @field_validator("created_at", "started_at", "heartbeat_at", "finished_at", mode="after")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return as_utc(value)


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


#: A noop job's request is its stored parameters.
NoopJobIn = NoopJob


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, Any] | None = Field(default=None, description="for admin keys only")
    versions: dict[str, str | None] | None = Field(default=None, description="for admin keys only")


class CellLineIn(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    species: str | None = Field(default=None, max_length=120)
    tissue: str | None = Field(default=None, max_length=120)
    notes: str | None = Field(default=None, max_length=5000)


class CellLineOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    species: str | None
    tissue: str | None
    notes: str | None


class ReporterIn(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    fluorophore: str | None = Field(default=None, max_length=120)
    protein: str | None = Field(default=None, max_length=120)
    localisation: str | None = Field(
        default=None, max_length=120, description="expected localisation, e.g. cytoplasmic, nuclear, translocating"
    )
    notes: str | None = Field(default=None, max_length=5000)


class ReporterOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    fluorophore: str | None
    protein: str | None
    localisation: str | None
    notes: str | None


class BaseModelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    source: str
    weights_sha256: str
    card: dict[str, Any]


class ModelVersionOut(BaseModel):
    id: int
    cell_line: str
    reporter: str
    object: str
    version: int
    status: str
    base_model: str | None
    parent_version_id: int | None
    dataset_id: int | None
    job_id: str | None
    training_params: dict[str, Any]
    weights_sha256: str | None
    diameter: float | None
    test_metrics: dict[str, Any]
    training_curve: list[dict[str, Any]]
    card: dict[str, Any]
    aliases: list[str]
    pseudo_labelled: bool = Field(
        default=False, description="trained on self-training pseudo-labels, no human annotation"
    )
    created_at: datetime

    @field_validator("created_at", mode="after")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return as_utc(value)


class AliasIn(StrictModel):
    version_id: int = Field(ge=1, le=MAX_ID)
    force: bool = False
    reason: str | None = Field(default=None, max_length=2000)


class AliasOut(BaseModel):
    cell_line: str
    reporter: str
    object: str
    alias: str
    version_id: int
    version: int
    history: list[dict[str, Any]] = []


class FusionParametersOut(BaseModel):
    """Flow Fusion fitted for a channel set on validation fields (weights per channel, thresholds)."""

    method: str = Field(description="equal, weights (one per channel) or per_pixel (confidence-weighted)")
    channels: list[str]
    weights: list[float]
    flow_threshold: float
    cellprob_threshold: float
    confidence: str | None = None
    cv_f1: float | None = Field(default=None, description="leave-one-field-out cross-validated F1@0.5")
    cv_interval: list[float] | None = Field(default=None, description="bootstrap 95 % interval over fields")
    n_fields: int = 0
    models: dict[str, int] = Field(default_factory=dict, description="model versions it was fitted for")
    details: dict[str, Any] = Field(default_factory=dict)


class ChannelSetOut(BaseModel):
    cell_line: str
    object: str
    method: str
    chosen: list[str]
    ranking: list[dict[str, Any]] = Field(
        description="best first; each row's F1 with its bootstrap 95 % "
        "interval over fields (f1_interval) and whether it is within noise "
        "of the best"
    )
    chosen_f1_interval: list[float] | None = None
    fusion_parameters: FusionParametersOut | None = None
    dataset_id: int | None
    job_id: str | None


class ChannelSetIn(StrictModel):
    channels: list[str] = Field(min_length=1, max_length=8)
    method: MethodLiteral = "flow_fusion"


class ResolutionOut(BaseModel):
    cell_line: str
    object: str
    alias: str
    models: dict[str, dict[str, Any]]
    missing: list[str]


class DatasetIn(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    cell_line: str = Field(min_length=1, max_length=120)
    channels: list[str] = Field(
        min_length=1, max_length=8, description="reporter name per channel index of every image"
    )
    acquisition: dict[str, Any] = Field(default_factory=dict, description="microscope, objective, pixel size ...")
    notes: str | None = Field(default=None, max_length=5000)


class DatasetImageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    filename: str
    image_sha256: str
    height: int
    width: int
    n_channels: int
    nuclei_sha256: str | None
    cells_sha256: str | None
    plate: str | None
    well: str | None
    field: int | None
    split: str | None


class DatasetOut(BaseModel):
    id: int
    name: str
    cell_line: str
    channels: list[str]
    acquisition: dict[str, Any]
    notes: str | None
    images: list[DatasetImageOut]
    split_counts: dict[str, int]


class FinetuneIn(StrictModel):
    dataset_id: int = Field(ge=1, le=MAX_ID)
    reporter: str = Field(min_length=1, max_length=120, description="the reporter channel to train on")
    object: ObjectLiteral
    base: str = Field(
        default="",
        max_length=200,
        description="base model name, or 'version:<id>' for a zoo version; empty = the shipped base",
    )
    params: FinetuneParams = Field(default_factory=FinetuneParams)


class PretrainISLIn(StrictModel):
    dataset_id: int = Field(ge=1, le=MAX_ID)
    source_channels: list[str] = Field(
        min_length=1, max_length=16, description="channels the network sees (label-free or reporters)"
    )
    target_channel: str = Field(min_length=1, max_length=120, description="the stain to predict (nuclear, membrane)")
    name: str = Field(
        min_length=1, max_length=120, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="the new base model's name"
    )
    init_base: str | None = Field(default=None, max_length=120, description="start from this base model")
    params: ISLParams = Field(default_factory=ISLParams)


class SelfTrainIn(StrictModel):
    dataset_id: int = Field(ge=1, le=MAX_ID)
    reporter: str = Field(min_length=1, max_length=120, description="the reporter channel the model is for")
    object: ObjectLiteral
    marker_channel: str | None = Field(default=None, max_length=120, description="a nuclear stain channel")
    marker_isl_model: str | None = Field(
        default=None, max_length=120, description="an ISL base model predicting the nuclear stain"
    )
    marker_source_channel: str | None = Field(
        default=None, max_length=120, description="the channel the ISL model reads (default: reporter)"
    )
    foreground_channel: str | None = Field(
        default=None, max_length=120, description="default: the marker channel for nuclei, the reporter for cells"
    )
    base: str = Field(default="", max_length=200, description="base of the pseudo-label fine-tune; empty = shipped")
    self_train: SelfTrainParams = Field(default_factory=SelfTrainParams)
    params: FinetuneParams = Field(default_factory=FinetuneParams)


class FieldMeta(StrictModel):
    well: str | None = Field(default=None, max_length=60)
    field: int | None = Field(default=None, ge=0, le=100_000)
    diameter: Diameter | dict[ObjectLiteral, Diameter] | None = Field(
        default=None, description="this field's object diameter in pixels (overrides params.diameter)"
    )


class SegmentRequest(StrictModel):
    cell_line: str = Field(min_length=1, max_length=120)
    channels: list[str] = Field(min_length=1, max_length=8, description="reporter name per channel index")
    objects: list[ObjectLiteral] = Field(default=["nuclei", "cells"], min_length=1, max_length=2)
    method: MethodLiteral = "flow_fusion"
    use_channels: list[str] | None = Field(
        default=None, max_length=8, description="channels to fuse; default: the zoo's chosen set"
    )
    alias: str = Field(default=DEFAULT_ALIAS, max_length=60)
    model: ModelChoice = Field(default="zoo", description=MODEL_DESCRIPTION)
    models: dict[str, ModelChoice] | None = Field(
        default=None, max_length=8, description="per channel, overriding 'model' (e.g. {'DAPI': 'base'})"
    )
    plate: str | None = Field(default=None, max_length=120)
    fields: list[FieldMeta] = Field(
        default_factory=list, max_length=1536, description="per uploaded file: {well, field}"
    )
    params: SegmentParams = Field(default_factory=SegmentParams)


class SegmentDatasetIn(StrictModel):
    dataset_id: int = Field(ge=1, le=MAX_ID)
    split: SplitLiteral | None = None
    objects: list[ObjectLiteral] = Field(default=["nuclei", "cells"], min_length=1, max_length=2)
    method: MethodLiteral = "flow_fusion"
    use_channels: list[str] | None = Field(default=None, max_length=8)
    alias: str = Field(default=DEFAULT_ALIAS, max_length=60)
    model: ModelChoice = Field(default="zoo", description=MODEL_DESCRIPTION)
    models: dict[str, ModelChoice] | None = Field(default=None, max_length=8)
    params: SegmentParams = Field(default_factory=SegmentParams)


class EvaluateIn(StrictModel):
    dataset_id: int = Field(ge=1, le=MAX_ID)
    split: SplitLiteral = "test"
    model_version_id: int | None = Field(default=None, ge=1, le=MAX_ID)
    object: ObjectLiteral | None = None
    use_channels: list[str] | None = Field(default=None, max_length=8)
    method: MethodLiteral = "flow_fusion"
    alias: str = Field(default=DEFAULT_ALIAS, max_length=60)
    model: ModelChoice = Field(default="zoo", description=MODEL_DESCRIPTION)
    models: dict[str, ModelChoice] | None = Field(default=None, max_length=8)
    params: SegmentParams = Field(
        default_factory=SegmentParams, description="diameter and thresholds (fusion or base evaluations)"
    )


class SelectChannelsIn(StrictModel):
    dataset_id: int = Field(ge=1, le=MAX_ID)
    object: ObjectLiteral
    split: SplitLiteral = "val"
    method: MethodLiteral = "flow_fusion"
    alias: str = Field(default=DEFAULT_ALIAS, max_length=60)
    metric: MetricLiteral = "f1"


class ApiKeyIn(StrictModel):
    name: str = Field(min_length=1, max_length=120, description="who or what uses the key")
    role: RoleLiteral = "instrument"


class ApiKeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    name: str
    role: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @field_validator("created_at", "revoked_at", mode="after")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return as_utc(value)


class ApiKeyCreatedOut(ApiKeyOut):
    key: str = Field(description="the key itself: shown this once, stored only as a hash")


class KeyIdentityOut(BaseModel):
    """Who the calling key is: the web page shows the role so that a user knows what they may do."""

    id: int
    name: str
    role: str
