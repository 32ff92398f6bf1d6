"""What the science jobs share: reading stored images and masks, loading model versions, recording
evaluations, and segmenting one object of a field with its channel plan.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import select

from app.job_params import ObjectPlan, SegmentParams
from app.models import Dataset, DatasetImage, Evaluation, ModelVersion
from workers.runner import JobContext, JobFailed

if TYPE_CHECKING:
    from workers.pipelines.preprocess import PlatePreprocessing

log = logging.getLogger(__name__)

# --- stored inputs ------------------------------------------------------------------------------


def read_blob(ctx: JobContext, sha256: str) -> bytes:
    try:
        return ctx.blobs.read_bytes(sha256)
    except KeyError as exc:
        raise JobFailed(f"a stored file ({sha256[:12]}…) is missing from the data directory") from exc


def read_field(ctx: JobContext, sha256: str) -> np.ndarray:
    """A stored multi-channel image as (C, Y, X)."""
    from app.science.image_files import read_image

    return read_image(read_blob(ctx, sha256), max_pixels=ctx.settings.max_image_pixels).data


def read_mask(ctx: JobContext, sha256: str | None) -> np.ndarray | None:
    from app.science.image_files import read_labels

    return None if sha256 is None else read_labels(read_blob(ctx, sha256))


def mask_sha(image: DatasetImage, obj: str) -> str | None:
    return image.nuclei_sha256 if obj == "nuclei" else image.cells_sha256


def evaluation_set_identity(digests: Iterable[str]) -> str:
    """'The same test set' means the same pixels and masks (``image_files.content_digest`` per image),
    whatever the files' bytes, names or order."""
    digest = hashlib.sha256(b"cellfuse-test-set-v2")
    for item in sorted(digests):
        digest.update(item.encode())
    return digest.hexdigest()


@dataclass
class LabelledImage:
    """One labelled dataset image, decoded: its full (C, Y, X) pixels, the mask and their digest."""

    row: DatasetImage
    image: np.ndarray
    mask: np.ndarray
    digest: str


def load_labelled(
    ctx: JobContext, rows: list[DatasetImage], obj: str, on_image: Callable[[int], None] | None = None
) -> list[LabelledImage]:
    from app.science.image_files import content_digest

    out = []
    for i, row in enumerate(rows):
        if on_image is not None:
            on_image(i)
        image, mask = read_field(ctx, row.image_sha256), read_mask(ctx, mask_sha(row, obj))
        if mask is None:
            raise JobFailed(f"dataset image {row.id} has no {obj} mask")
        out.append(LabelledImage(row, image, mask, content_digest(image, mask)))
    return out


def labelled_split(ctx: JobContext, dataset_id: int, split: str, obj: str) -> tuple[Dataset, list[DatasetImage]]:
    ds = ctx.session.get(Dataset, dataset_id)
    if ds is None:
        raise JobFailed(f"dataset {dataset_id} no longer exists")
    images = [im for im in ds.images if im.split == split and mask_sha(im, obj)]
    if not images:
        raise JobFailed(f"dataset {dataset_id} has no {obj}-labelled images in split {split!r}")
    return ds, images


# --- models -------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    net: Any
    diameter: float
    diam_mean: float
    name: str
    weights_sha256: str
    #: The card's thresholds for this model's own maps (None: Cellpose's 0.4 and 0).
    flow_threshold: float | None = None
    cellprob_threshold: float | None = None

    def channel_model(self, channel: str):
        """This network as the science core's ``ChannelModel`` for one channel of a field."""
        from app.science.segmentation import ChannelModel

        return ChannelModel(
            net=self.net,
            diameter=self.diameter,
            diam_mean=self.diam_mean,
            name=channel,
            flow_threshold=self.flow_threshold,
            cellprob_threshold=self.cellprob_threshold,
        )


def load_weights(ctx: JobContext, sha256: str, card: dict[str, Any], source: str) -> Any:
    """A stored network on this worker's device, from the process's model cache when it is there.

    Cached networks are shared by every job of the process: nothing may train or modify them in
    place (fine-tuning trains a copy, ``training.fresh_copy``).
    """
    from workers.compute import worker_compute

    compute = worker_compute(ctx.settings)
    cellpose_file = source == "cellpose" or card.get("format") == "cellpose-state-dict"
    # A Cellpose file's diam_mean comes from its card, so the card's value is part of what is cached.
    key = f"{sha256}:diam_mean={float(card.get('diam_mean', 30.0))}" if cellpose_file else sha256
    return compute.cache.get_or_load(
        key, compute.device, lambda: _load_weights_now(ctx, sha256, card, cellpose_file, compute.device)
    )


def _load_weights_now(ctx: JobContext, sha256: str, card: dict[str, Any], cellpose_file: bool, device) -> Any:
    from app.science import weights

    path = ctx.blobs.path_for(sha256)
    if not path.is_file():
        raise JobFailed(
            f"the weights of {card.get('name', 'the model')} ({sha256[:12]}…) are not in the data directory"
        )
    if cellpose_file:
        if weights.file_sha256(path) != sha256:
            raise JobFailed(f"the weights of {card.get('name')} do not match their sha256")
        net = weights.import_cellpose_file(path, device=device)
        net.diam_mean.data[:] = float(card.get("diam_mean", 30.0))
        return net
    net, _card = weights.load_model(
        path, card=weights.ModelCard.from_dict(_card_for_loading(card)), expected_sha256=sha256, device=device
    )
    return net


def _card_for_loading(card: dict[str, Any]) -> dict[str, Any]:
    if "architecture" in card:
        return card
    return {
        **card,
        "name": card.get("name", "upload"),
        "version": card.get("version", "upload"),
        "architecture": {
            "type": "cellpose-cpnet",
            "widths": card.get("widths", [32, 64, 128, 256]),
            "nchan": 2,
            "nout": 3,
        },
    }


def model_version(ctx: JobContext, version_id: int) -> ModelVersion:
    """A zoo version that still exists and has weights (a deleted one is a clear failure)."""
    version = ctx.session.get(ModelVersion, version_id)
    if version is None:
        raise JobFailed(f"model version {version_id} no longer exists")
    if version.weights_sha256 is None:
        raise JobFailed(f"model version {version_id} has no weights (status {version.status})")
    return version


@dataclass(frozen=True)
class ModelSource:
    """Where a channel's network comes from: a zoo version, or a base model segmenting directly
    (zero-shot). ``diameter`` is the size it was trained at; ``card`` carries its size model and
    preprocessing recipe."""

    kind: str  # "zoo" | "base"
    id: int
    weights_sha256: str
    card: dict[str, Any]
    diameter: float
    label: str
    weights_format: str  # what load_weights needs: "zoo", or a base model's source

    @property
    def size_model(self) -> dict[str, Any] | None:
        return (self.card or {}).get("size_model") or None

    def provenance(self) -> dict[str, Any]:
        key = {"model_version_id": self.id} if self.kind == "zoo" else {"base_model": self.label}
        return {**key, "weights_sha256": self.weights_sha256, "diameter": self.diameter}


def zoo_source(ctx: JobContext, version_id: int) -> ModelSource:
    version = model_version(ctx, version_id)
    reporter = version.reporter.name if version.reporter is not None else "deleted reporter"
    return ModelSource(
        kind="zoo",
        id=version.id,
        weights_sha256=str(version.weights_sha256),
        card=version.card or {},
        diameter=float(version.diameter or 30.0),
        label=f"{reporter}/{version.object}/v{version.version}",
        weights_format="zoo",
    )


def base_source(ctx: JobContext, base_id: int) -> ModelSource:
    from app.models import BaseNetwork

    row = ctx.session.get(BaseNetwork, base_id)
    if row is None:
        raise JobFailed(f"base model {base_id} no longer exists")
    card = row.card or {}
    return ModelSource(
        kind="base",
        id=row.id,
        weights_sha256=row.weights_sha256,
        card=card,
        diameter=float(card.get("diameter") or card.get("diam_mean") or 30.0),
        label=row.name,
        weights_format=row.source,
    )


def model_source(ctx: JobContext, plan: ObjectPlan, channel: str) -> ModelSource:
    if channel in plan.base_models:
        return base_source(ctx, plan.base_models[channel])
    return zoo_source(ctx, plan.models[channel])


def load_source(ctx: JobContext, source: ModelSource, cache: dict[Any, LoadedModel]) -> LoadedModel:
    key = (source.kind, source.id)
    if key not in cache:
        net = load_weights(ctx, source.weights_sha256, source.card, source.weights_format)
        thresholds = card_thresholds(source.card)
        cache[key] = LoadedModel(
            net=net,
            diameter=source.diameter,
            diam_mean=float(net.diam_mean.item()),
            name=source.label,
            weights_sha256=source.weights_sha256,
            flow_threshold=thresholds.get("flow_threshold"),
            cellprob_threshold=thresholds.get("cellprob_threshold"),
        )
    return cache[key]


def card_thresholds(card: dict[str, Any] | None) -> dict[str, float]:
    """The mask thresholds a model card stores for the model's own maps (may be empty)."""
    stored = (card or {}).get("thresholds") or {}
    return {k: float(stored[k]) for k in ("flow_threshold", "cellprob_threshold") if stored.get(k) is not None}


def load_version(ctx: JobContext, version_id: int, cache: dict[Any, LoadedModel]) -> LoadedModel:
    return load_source(ctx, zoo_source(ctx, version_id), cache)


def library_versions() -> dict[str, str]:
    from app.science.weights import library_versions as versions

    return versions()


def compute_provenance(ctx: JobContext) -> dict[str, Any]:
    """Where and at what precision this job's networks ran (for provenance and model cards)."""
    from workers.compute import worker_compute

    return worker_compute(ctx.settings).describe()


def inference_options(ctx: JobContext) -> dict[str, Any]:
    """``precision`` and ``mask_device`` for the science calls of this worker."""
    from workers.compute import worker_compute

    compute = worker_compute(ctx.settings)
    return {"precision": compute.precision, "mask_device": compute.device}


# --- evaluations --------------------------------------------------------------------------------


def record_evaluation(
    ctx: JobContext,
    dataset_id: int,
    split: str,
    metrics: dict[str, Any],
    test_set: str,
    *,
    model_version_id: int | None = None,
    fusion: dict[str, Any] | None = None,
) -> None:
    row = ctx.session.scalar(
        select(Evaluation).where(Evaluation.job_id == ctx.job_id, Evaluation.model_version_id == model_version_id)
    )
    if row is None:
        row = Evaluation(
            job_id=ctx.job_id,
            model_version_id=model_version_id,
            dataset_id=dataset_id,
            split=split,
            test_set_sha256=test_set,
            metrics=metrics,
            fusion=fusion,
        )
        ctx.session.add(row)
    else:
        row.metrics, row.fusion, row.test_set_sha256 = metrics, fusion, test_set
    ctx.session.commit()


# --- segmentation of one object -------------------------------------------------------------------


def channel_models(ctx: JobContext, plan: ObjectPlan, cache: dict[Any, LoadedModel]):
    return [load_source(ctx, model_source(ctx, plan, name), cache).channel_model(name) for name in plan.channels]


@dataclass(frozen=True)
class DiameterChoice:
    """The diameter an object of a field is segmented at, and where it came from: "field" (the
    request's, for this field), "request", "plate estimate" / "field estimate" (the size models'
    two-pass estimate) or "model default" (the models' training diameters; ``value`` None)."""

    value: float | None
    source: str
    estimate: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {"diameter_source": self.source}
        if self.estimate is not None:
            out["diameter_estimate"] = self.estimate
        return out


def given_diameter_choice(seg: SegmentParams, obj: str, field_diameter=None) -> DiameterChoice | None:
    """A diameter the request gave (for this field first), or None when it must be found."""
    from app.job_params import given_diameter

    per_field = given_diameter(field_diameter, obj)
    if per_field is not None:
        return DiameterChoice(per_field, "field")
    request = seg.diameter_for(obj)
    return None if request is None else DiameterChoice(request, "request")


def estimate_object_diameter(
    ctx: JobContext,
    inputs: np.ndarray,
    plan: ObjectPlan,
    cache: dict[Any, LoadedModel],
    seg: SegmentParams,
    normalizations=None,
) -> tuple[float | None, list[dict[str, Any]]]:
    """Cellpose 3's two-pass size estimate (style regression, then the median diameter of the masks
    found at it) from each fused channel's size model, combined over channels (median of those that
    found objects, ``size_model.combine_estimates``). ``inputs``: the plan's channels, (K, Y, X).
    Returns (diameter or None when no channel's model has a size model, per-channel records)."""
    from app.science.size_model import SizeModel, combine_estimates
    from app.science.training import estimate_image_diameter

    estimates, records = [], []
    for k, name in enumerate(plan.channels):
        source = model_source(ctx, plan, name)
        if not source.size_model:
            records.append({"channel": name, "size_model": False})
            continue
        loaded = load_source(ctx, source, cache)
        estimate = estimate_image_diameter(
            loaded.net,
            SizeModel.from_dict(source.size_model),
            inputs[k],
            # The second pass segments one channel's maps: that model's own thresholds.
            flow_threshold=0.4 if loaded.flow_threshold is None else loaded.flow_threshold,
            cellprob_threshold=loaded.cellprob_threshold or 0.0,
            min_size=seg.min_size,
            tile=False,
            normalization=None if normalizations is None else normalizations[k],
        )
        estimates.append(estimate)
        records.append({"channel": name, **estimate.to_dict()})
        ctx.progress()
    return combine_estimates(estimates), records


def segment_object(
    ctx: JobContext,
    image,
    channels: list[str],
    plan: ObjectPlan,
    method: str,
    seg: SegmentParams,
    cache: dict[Any, LoadedModel],
    used: dict | None = None,
    *,
    obj: str | None = None,
    prep: PlatePreprocessing | None = None,
    styles_out: dict[str, list[float]] | None = None,
    diameter: DiameterChoice | None = None,
) -> np.ndarray:
    """Instance labels of one object in a (C, Y, X) field; cancellation is checked between channels.

    With ``prep`` (and ``obj``), each channel first goes through its model's preprocessing recipe
    (illumination correction, plate-level percentiles); without, Cellpose's per-image scaling.
    Flow Fusion applies the plan's fitted fusion parameters when it has them; ``used`` (a dict)
    receives the settings actually applied (weights, confidence, thresholds, their source).
    A field of more than ``settings.segment_block_pixels`` pixels (Y*X; ``image`` may then be a lazy
    array such as an OME-Zarr field) is segmented in overlapping blocks (``app.science.blocked``),
    with one field-wide normalisation and equal fusion weights (the recipe and the fitted fusion
    need the whole field in memory). ``styles_out`` receives each fused channel's style vector.

    ``diameter``: what the caller decided (a field's or the request's diameter, a plate estimate);
    None: the request's diameter, else (estimate_diameter "per-field", or "per-plate" without a
    caller's estimate) this field's own size-model estimate, else the models' training diameters.
    """
    from app.science.segmentation import segment_field

    models = channel_models(ctx, plan, cache)
    indices = [channels.index(name) for name in plan.channels]
    large = image.shape[-2] * image.shape[-1] > ctx.settings.segment_block_pixels
    choice = diameter or given_diameter_choice(seg, obj or "")
    if choice is not None and choice.value is not None:
        models = [replace(m, diameter=float(choice.value)) for m in models]
    if large and method == "flow_fusion":
        from app.science.blocked import segment_blocked

        view = _ChannelSubset(image, indices)
        block = int(ctx.settings.segment_block_pixels**0.5)
        blocked = segment_blocked(
            view,
            models,
            block_size=max(64, block // 2),
            memory_budget_bytes=ctx.settings.segment_memory_budget_mb << 20,
            flow_threshold=seg.flow_threshold,
            cellprob_threshold=seg.cellprob_threshold if seg.cellprob_threshold is not None else 0.0,
            min_size=seg.min_size,
        )
        styles, labels = blocked.styles, np.asarray(blocked.labels)
        if used is not None:
            used.update({"blocked": True, **blocked.stats, "diameter": models[0].diameter})
            # A field larger than memory is not estimated: the request's diameter or the models'.
            used.update((choice or DiameterChoice(None, "model default")).record())
    else:
        image = np.asarray(image)
        if prep is not None and obj is not None:
            inputs, normalizations = prep.inputs(obj, plan.channels, image, channels)
        else:
            inputs, normalizations = image[indices], None
        if choice is None and seg.estimation("per-field") != "off":
            estimated, records = estimate_object_diameter(ctx, inputs, plan, cache, seg, normalizations)
            if estimated is None:
                choice = DiameterChoice(None, "model default (no size model)")
            else:
                choice = DiameterChoice(estimated, "field estimate", {"channels": records})
                models = [replace(m, diameter=estimated) for m in models]
        fusion = plan.fusion if method == "flow_fusion" else None
        result = segment_field(
            inputs,
            models,
            method=method,
            flow_threshold=seg.flow_threshold,
            cellprob_threshold=seg.cellprob_threshold,
            min_size=seg.min_size,
            normalizations=normalizations,
            checkpoint=lambda: ctx.progress(),
            fusion=fusion,
            **inference_options(ctx),
        )
        if used is not None:
            used.update(result.settings)
            used.update((choice or DiameterChoice(None, "model default")).record())
            if fusion is not None:
                used["weights_source"] = plan.fusion_source or used.get("weights_source")
        styles, labels = [m.style for m in result.channel_maps], result.labels
    if styles_out is not None:
        for name, style in zip(plan.channels, styles, strict=True):
            styles_out[name] = [round(float(v), 6) for v in style]
    return labels


class _ChannelSubset:
    """A lazy (K, Y, X) view of some channels of a lazy (C, Y, X) field."""

    def __init__(self, image, indices: list[int]):
        self.image, self.indices = image, indices
        self.shape = (len(indices), *image.shape[-2:])
        self.ndim = 3

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        rest = key[1:] if len(key) > 1 else ()
        block = np.stack([np.asarray(self.image[(c, *rest)]) for c in self.indices])
        return block[key[0]] if key and key[0] != slice(None) else block


def store_trained_version(
    ctx: JobContext, version: ModelVersion, net, card, curve: list, metrics: dict, diameter: float
) -> None:
    """Save a trained net with its card, publish card and curve as results, and mark the version ready
    (the caller commits)."""
    import json

    from app.science import weights

    saved = weights.save_model(net, card, ctx.folder.path / "model", "model")
    blob = ctx.blobs.put_bytes(saved.weights_path.read_bytes())
    ctx.add_result("model/card.json", saved.card_path.read_bytes(), kind="model_card", media_type="application/json")
    ctx.add_result(
        "training_curve.json", json.dumps(curve).encode(), kind="training_curve", media_type="application/json"
    )
    version.weights_sha256 = blob.sha256
    version.card = saved.card.to_dict()
    version.diameter = float(diameter)
    version.test_metrics = metrics
    version.training_curve = curve
    version.status = "ready"
