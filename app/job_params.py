"""The typed job contract: what each job kind's parameters are, shared by the API and the workers.

The API validates a request, resolves names to ids and stores one of these models (as JSON) on the
job row; the worker reads the row back as the same model. Celery carries only the job id.

>>> job = NoopJob(steps=2)
>>> NoopJob.model_validate(job.model_dump(mode="json")) == job
True
>>> sorted(JOB_PARAMS)
['evaluate', 'finetune', 'noop', 'pretrain_isl', 'segment', 'select_channels', 'self_train']
"""

from __future__ import annotations

import json
from collections.abc import Mapping
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from app.vocabulary import (
    DEFAULT_ALIAS,
    MethodLiteral,
    MetricLiteral,
    ObjectLiteral,
    SplitLiteral,
)

#: Free-form JSON (a dataset's acquisition, ...): deep nesting and huge documents are refused, so
#: that what is stored can always be read back and serialised.
MAX_JSON_DEPTH = 8
MAX_JSON_BYTES = 64 * 1024
MAX_JSON_INT = 2**63 - 1


def storable_problem(value: Any, path: str, depth: int = 0) -> str | None:
    """Why ``value`` cannot be stored in and read back from SQLite and PostgreSQL (None: it can).

    PostgreSQL refuses NUL characters and NaN/Infinity in JSON; an unpaired surrogate cannot be
    encoded as UTF-8; deep nesting breaks serialisation on the way out.
    """
    if isinstance(value, str):
        if "\x00" in value:
            return f"{path}: the NUL character (\\u0000) is not allowed"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{path}: an unpaired surrogate (\\ud800-\\udfff) is not valid text"
        return None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path}: NaN and infinite numbers are not allowed"
    if isinstance(value, int):
        return None if abs(value) <= MAX_JSON_INT else f"{path}: integers must fit in 64 bits"
    if isinstance(value, dict | list | tuple):
        if depth >= MAX_JSON_DEPTH:
            return f"{path}: nested deeper than {MAX_JSON_DEPTH} levels"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            sub = f"{path}.{key}" if isinstance(value, dict) else f"{path}[{key}]"
            if isinstance(key, str) and (problem := storable_problem(key, f"{path} (a key)", depth)):
                return problem
            if problem := storable_problem(item, sub, depth + 1):
                return problem
        return None
    if isinstance(value, BaseModel):
        return None  # checked by its own validator
    return None


def _jsonable(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else str(value)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @model_validator(mode="after")
    def _storable(self):
        for name in type(self).model_fields:
            value = getattr(self, name)
            if problem := storable_problem(value, name):
                raise PydanticCustomError("unstorable_value", problem)
            if isinstance(value, dict) and len(json.dumps(value, default=_jsonable)) > MAX_JSON_BYTES:
                raise PydanticCustomError("json_too_large", f"{name}: larger than {MAX_JSON_BYTES} bytes as JSON")
        return self


# --- parameters a client sets (also part of the API's request bodies) -------------------------

#: An object diameter in pixels (a request's, a field's).
Diameter = Annotated[float, Field(gt=0, le=1000)]
EstimateLiteral = Literal["per-plate", "per-field", "off"]


def given_diameter(value: float | Mapping[Any, float] | None, obj: str) -> float | None:
    """A diameter given for every object (a number) or per object (a dict), for ``obj``.

    >>> given_diameter(20.0, "cells"), given_diameter({"nuclei": 9.5}, "nuclei"), given_diameter(None, "nuclei")
    (20.0, 9.5, None)
    """
    if isinstance(value, Mapping):
        found = value.get(obj)
        return None if found is None else float(found)
    return None if value is None else float(value)


class PreprocessingRecipe(StrictModel):
    """How a channel's raw pixels become network input; fixed at fine-tuning, reused at inference.

    ``illumination``: ``none``; ``per-plate`` (a BaSiC flatfield estimated per channel from all
    fields of the plate or dataset, as CellProfiler's CorrectIlluminationCalculate per plate); or
    ``profile`` (a stored profile, ``profile_id``: estimated earlier or uploaded). ``normalization``:
    ``per-image`` (Cellpose's 1st-99th percentile of each field) or ``per-plate`` (the same
    percentiles over all fields of the plate or dataset, so a dim field stays dim).
    """

    illumination: Literal["none", "per-plate", "profile"] = "none"
    profile_id: int | None = Field(default=None, ge=1, le=2**31 - 1)
    darkfield: bool = Field(default=False, description="with per-plate: BaSiC also fits a darkfield")
    normalization: Literal["per-image", "per-plate"] = "per-image"
    lower_percentile: float = Field(default=1.0, ge=0, lt=100)
    upper_percentile: float = Field(default=99.0, gt=0, le=100)

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessingRecipe:
        if (self.illumination == "profile") != (self.profile_id is not None):
            raise ValueError("give profile_id exactly when illumination is 'profile'")
        if self.lower_percentile >= self.upper_percentile:
            raise ValueError("lower_percentile must be below upper_percentile")
        return self


def recipe_from_card(card: dict | None) -> PreprocessingRecipe:
    """The recipe a model was trained with, from its card (older models: per-image, no correction).

    >>> recipe_from_card({}).normalization
    'per-image'
    """
    record = ((card or {}).get("data") or {}).get("preprocessing") or {}
    return PreprocessingRecipe.model_validate(record.get("recipe") or {})


def training_profile_from_card(card: dict | None) -> dict | None:
    """The illumination profile a model was trained with ({id, sha256, ...}), if any."""
    record = ((card or {}).get("data") or {}).get("preprocessing") or {}
    return record.get("illumination_profile")


class FinetuneParams(StrictModel):
    # Longer than Cellpose's early-stopping habits: on a 40-field synthetic fine-tune the validation
    # loss still fell from 0.55 (epoch 50) to 0.38 (epochs 260-280), and the field reported fine-tunes
    # stopped at epochs 60-95 about 0.07 F1 below ones given 300 epochs (README, "Fine-tune length").
    max_epochs: int = Field(default=300, ge=1, le=5000)
    min_epochs: int = Field(default=100, ge=0, le=5000)
    patience: int = Field(default=50, ge=1, le=1000)
    learning_rate: float | None = Field(default=None, gt=0, le=1.0)
    weight_decay: float | None = Field(default=None, ge=0, le=1.0)
    batch_size: int = Field(default=8, ge=1, le=64)
    bsize: int = Field(default=224, ge=64, le=512)
    augment: bool = True
    microscopy_augment: bool = True
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    n_train: int = Field(default=40, ge=1, le=100_000)
    n_val: int = Field(default=5, ge=1, le=100_000)
    n_test: int = Field(default=5, ge=1, le=100_000)
    preprocessing: PreprocessingRecipe = Field(
        default_factory=PreprocessingRecipe, description="recorded on the model card and reused at inference"
    )


class SegmentParams(StrictModel):
    flow_threshold: float | None = Field(default=None, ge=0, le=10)
    cellprob_threshold: float | None = Field(
        default=None, ge=-20, le=20, description="default: 0, or the fitted fusion's value"
    )
    learned_fusion: bool = Field(
        default=True,
        description="Flow Fusion uses the weights and thresholds fitted "
        "for this channel set by select-channels, when the zoo has them",
    )
    min_size: int = Field(
        default=15,
        ge=0,
        le=100_000,
        description="smallest mask kept, in pixels at the model's training scale (Cellpose's 15 for 30-px objects); "
        "for objects smaller than the training size it shrinks with their area",
    )
    diameter: Diameter | dict[ObjectLiteral, Diameter] | None = Field(
        default=None,
        description="object diameter in pixels, for every object or per object ({'nuclei': 12, 'cells': 30}); "
        "default: estimated with the models' size models (estimate_diameter)",
    )
    estimate_diameter: EstimateLiteral | None = Field(
        default=None,
        description="without a diameter: 'per-plate' (one two-pass size-model estimate from up to 3 fields, "
        "the default for plates), 'per-field' (each field its own; the default for datasets and evaluations) "
        "or 'off' (the models' training diameters). true/false mean per-field/off.",
    )
    preview_channel: int = Field(default=0, ge=0, le=15)
    preprocessing: PreprocessingRecipe | None = Field(
        default=None,
        description="default: each channel's model's own recipe (from its card); given here, it "
        "overrides every channel's and the override is recorded",
    )

    @field_validator("estimate_diameter", mode="before")
    @classmethod
    def _legacy_flag(cls, value: Any) -> Any:
        # Requests from before the three modes sent a flag.
        if isinstance(value, bool):
            return "per-field" if value else "off"
        return value

    def diameter_for(self, obj: str) -> float | None:
        """The request's diameter for ``obj`` (None: not given).

        >>> SegmentParams(diameter={"nuclei": 12}).diameter_for("cells") is None
        True
        """
        return given_diameter(self.diameter, obj)

    def estimation(self, default: str) -> str:
        """How a missing diameter is found: the request's mode, else ``default`` for this kind of job."""
        return self.estimate_diameter or default


class ISLParams(StrictModel):
    """In-silico-labelling pretext training (``app.science.isl``)."""

    max_epochs: int = Field(default=100, ge=1, le=5000)
    min_epochs: int = Field(default=5, ge=0, le=5000)
    patience: int = Field(default=10, ge=1, le=1000)
    learning_rate: float = Field(default=0.002, gt=0, le=1.0)
    batch_size: int = Field(default=8, ge=1, le=64)
    bsize: int = Field(default=224, ge=32, le=512)
    crops_per_pair: int = Field(default=2, ge=1, le=64)
    val_fraction: float = Field(
        default=0.2,
        ge=0.0,
        le=0.5,
        description="share of images for early stopping when the dataset has no 'val' split",
    )
    diameter: float | None = Field(
        default=None, gt=0, le=1000, description="object size in pixels in the target stain; default: estimated"
    )
    widths: Literal["half", "full"] = Field(default="half", description="CPnet width when not starting from a base")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class SelfTrainParams(StrictModel):
    """Marker-controlled pseudo-labelling (``app.science.self_training``)."""

    epochs: int = Field(default=40, ge=1, le=2000)
    patch_scale: float = Field(default=2.0, gt=0.5, le=8.0)
    lam: float = Field(default=1.0, ge=0, le=100)
    beta: float = Field(default=2.0, ge=0, le=100)
    learning_rate: float = Field(default=0.002, gt=0, le=1.0)
    diameter: float | None = Field(
        default=None, gt=0, le=1000, description="nucleus diameter in pixels; default: estimated (Otsu)"
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


# --- what the API resolved and the worker runs -------------------------------------------------


class JobParams(StrictModel):
    """Base of every job's stored parameters."""


class ObjectPlan(StrictModel):
    """For one object: the channels to fuse, why those, and the model version per channel."""

    channels: list[str]
    channel_source: str
    #: Channel -> zoo model version id...
    models: dict[str, int]
    #: ...or channel -> base model id (a base model segmenting directly: zero-shot).
    base_models: dict[str, int] = Field(default_factory=dict)
    #: Fitted fusion parameters (``flow_fusion.FusionParameters`` as a dict) for exactly these
    #: channels and model versions, from the zoo's channel set; None: equal weights.
    fusion: dict | None = None
    fusion_source: str | None = None

    @model_validator(mode="after")
    def _one_model_per_channel(self) -> ObjectPlan:
        for name in self.channels:
            if (name in self.models) == (name in self.base_models):
                raise ValueError(f"channel {name!r} needs exactly one model (a zoo version or a base model)")
        return self


class FieldSpec(StrictModel):
    """One field of a plate (an uploaded file or a dataset image). ``name`` is unique in its job."""

    name: str
    well: str | None = None
    field: int | None = None
    filename: str | None = None
    image_sha256: str | None = None
    dataset_image_id: int | None = None
    # A field of an OME-Zarr plate: its image group, relative to the plate root.
    zarr_path: str | None = None
    #: The diameter the request gave for this field (overrides the request-wide one).
    diameter: Diameter | dict[ObjectLiteral, Diameter] | None = None


class OmeZarrSource(StrictModel):
    """Where a segmentation's OME-Zarr plate is: a folder the workers read (labels are written into
    it, next to each image), or an uploaded zipped plate (unpacked into the job's folder)."""

    path: str | None = None
    zip_sha256: str | None = None
    root_in_zip: str = ""
    version: str
    wells: list[str] | None = None
    channel_names: list[str]


class NoopJob(JobParams):
    steps: int = Field(default=3, ge=1, le=1000)
    step_seconds: float = Field(default=0.2, ge=0, le=60)
    fail: bool = False


class FinetuneJob(JobParams):
    dataset_id: int
    reporter: str
    object: ObjectLiteral
    base: str = Field(description="a base model name, or 'version:<id>' for a zoo version")
    cell_line: str
    params: FinetuneParams = Field(default_factory=FinetuneParams)

    @property
    def parent_version_id(self) -> int | None:
        return int(self.base.split(":", 1)[1]) if self.base.startswith("version:") else None


class SegmentJob(JobParams):
    cell_line: str
    channels: list[str]
    objects: list[ObjectLiteral]
    method: MethodLiteral = "flow_fusion"
    alias: str = DEFAULT_ALIAS
    plate: str | None = None
    plan: dict[str, ObjectPlan]
    fields: list[FieldSpec]
    dataset_id: int | None = None
    params: SegmentParams = Field(default_factory=SegmentParams)
    ome_zarr: OmeZarrSource | None = None


class EvaluateJob(JobParams):
    dataset_id: int
    split: SplitLiteral = "test"
    object: ObjectLiteral
    # Either one model version on its reporter's channel...
    model_version_id: int | None = None
    reporter: str | None = None
    # ...or a fusion of the plan's channels.
    method: MethodLiteral | None = None
    plan: dict[str, ObjectPlan] | None = None
    params: SegmentParams = Field(default_factory=SegmentParams)


class SelectChannelsJob(JobParams):
    dataset_id: int
    object: ObjectLiteral
    split: SplitLiteral = "val"
    method: MethodLiteral = "flow_fusion"
    alias: str = DEFAULT_ALIAS
    metric: MetricLiteral = "f1"
    plan: dict[str, ObjectPlan]
    cell_line: str


class PretrainISLJob(JobParams):
    dataset_id: int
    source_channels: list[str] = Field(min_length=1)
    target_channel: str
    name: str = Field(description="the base model's name in the zoo")
    init_base: str | None = Field(default=None, description="a base model to start from; None = random init")
    params: ISLParams = Field(default_factory=ISLParams)


class SelfTrainJob(JobParams):
    dataset_id: int
    reporter: str
    object: ObjectLiteral
    cell_line: str
    base: str = Field(description="base model name, or 'version:<id>', the pseudo-label fine-tune starts from")
    #: Markers from this nuclear channel of the dataset...
    marker_channel: str | None = None
    #: ...or from a nuclear map predicted by this ISL base model from ``marker_source_channel``.
    marker_isl_model: str | None = None
    marker_source_channel: str | None = None
    foreground_channel: str
    self_train: SelfTrainParams = Field(default_factory=SelfTrainParams)
    params: FinetuneParams = Field(default_factory=FinetuneParams)

    @property
    def parent_version_id(self) -> int | None:
        return int(self.base.split(":", 1)[1]) if self.base.startswith("version:") else None


#: Job kind -> its parameter model (the worker reads a job row's params as this).
JOB_PARAMS: dict[str, type[JobParams]] = {
    "noop": NoopJob,
    "finetune": FinetuneJob,
    "segment": SegmentJob,
    "evaluate": EvaluateJob,
    "select_channels": SelectChannelsJob,
    "pretrain_isl": PretrainISLJob,
    "self_train": SelfTrainJob,
}
