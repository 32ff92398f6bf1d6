"""Segment one multi-channel field with one model per channel and a fusion method.

This is what the workers call. Flow Fusion (the default) averages the channels' maps and
reconstructs masks once; the label-fusion baselines reconstruct masks per channel and fuse the
label images (``label_fusion``).

Typical use::

    models = [ChannelModel(net_a, diameter=24.0, diam_mean=30.0, name="cyto"), ...]
    result = segment_field(field, models)          # field: (K, Y, X)
    result.labels, result.timings["total"]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from app.science.backbone import ChannelMaps, Normalization, masks_from_maps, predict_maps_multi
from app.science.flow_fusion import FUSED_FLOW_THRESHOLD, FusionParameters, fuse_maps
from app.science.label_fusion import FUSION_METHODS, fuse_labels

#: Cellpose's flow-error threshold, used for a single channel's own (unfused) maps.
CHANNEL_FLOW_THRESHOLD = 0.4


class SegmentationInputError(ValueError):
    """A field, model list or setting that ``segment_field`` cannot work with."""


@dataclass(frozen=True)
class ChannelModel:
    """The network for one channel and the object size it expects.

    ``diameter``: object diameter in pixels to give at inference (the one used in training);
    ``diam_mean``: the size objects were rescaled to in training (the net's own ``diam_mean``);
    ``flow_threshold`` / ``cellprob_threshold``: the thresholds stored for this model's own maps
    (its card's ``thresholds``; None: Cellpose's 0.4 and 0).
    """

    net: torch.nn.Module
    diameter: float
    diam_mean: float
    name: str
    flow_threshold: float | None = None
    cellprob_threshold: float | None = None

    @property
    def own_flow_threshold(self) -> float:
        """The flow threshold for this channel's unfused maps: the model's, else Cellpose's 0.4."""
        return CHANNEL_FLOW_THRESHOLD if self.flow_threshold is None else float(self.flow_threshold)

    @property
    def own_cellprob_threshold(self) -> float:
        """The cell-probability threshold for this channel's unfused maps: the model's, else 0."""
        return 0.0 if self.cellprob_threshold is None else float(self.cellprob_threshold)

    def __post_init__(self) -> None:
        if not (self.diameter > 0 and self.diam_mean > 0):
            raise SegmentationInputError(
                f"channel model {self.name!r}: diameter and diam_mean must be positive pixel sizes, "
                f"got {self.diameter} and {self.diam_mean}"
            )


@dataclass(frozen=True)
class SegmentationResult:
    """Fused labels (Y, X) int32, every channel's maps, the fused maps (Flow Fusion only), the
    per-channel labels (label fusion only) and wall-clock seconds per stage."""

    labels: np.ndarray
    channel_maps: list[ChannelMaps]
    fused_maps: np.ndarray | None
    channel_labels: list[np.ndarray] | None
    timings: dict[str, float] = field(default_factory=dict)
    #: What was actually used: weights, confidence, thresholds, and where they came from.
    settings: dict = field(default_factory=dict)


def reconstruction_size(channel_models: Sequence[ChannelModel]) -> tuple[float, float]:
    """(diameter, diam_mean) for masks from fused maps: the channels' means.

    They only set the number of dynamics steps (200 x diameter / diam_mean); channels of one
    field see the same objects, so their diameters agree up to training noise.
    """
    return (
        float(np.mean([m.diameter for m in channel_models])),
        float(np.mean([m.diam_mean for m in channel_models])),
    )


@dataclass(frozen=True)
class _FusionChoice:
    """How Flow Fusion weighs and thresholds, after resolving weights or fitted parameters."""

    weights: list[float] | None
    confidence: str | None
    source: str
    flow_threshold: float | None
    cellprob_threshold: float


def _check_options(
    method: str,
    weights,
    fusion_params,
    fusion: FusionParameters | dict | None = None,
    models: Sequence[ChannelModel] | None = None,
) -> _FusionChoice:
    """Validate a method's options; resolve fitted fusion parameters to weights for ``models``."""
    if method not in FUSION_METHODS:
        raise SegmentationInputError(f"unknown fusion method {method!r}; valid methods: {', '.join(FUSION_METHODS)}")
    if method == "flow_fusion" and fusion_params:
        raise SegmentationInputError("fusion_params apply to label-fusion methods only; use weights for flow_fusion")
    if method != "flow_fusion" and (weights is not None or fusion is not None):
        raise SegmentationInputError("channel weights and fitted fusion parameters apply to flow_fusion only")
    if fusion is None:
        # One channel's maps are not fused: they get the model's own threshold (Cellpose's 0.4),
        # not the one for averaged flows.
        return _FusionChoice(
            None if weights is None else [float(w) for w in weights],
            None,
            "explicit weights" if weights is not None else "equal weights",
            models[0].own_flow_threshold if models is not None and len(models) == 1 else FUSED_FLOW_THRESHOLD,
            models[0].own_cellprob_threshold if models is not None and len(models) == 1 else 0.0,
        )
    if weights is not None:
        raise SegmentationInputError("give either weights or fitted fusion parameters, not both")
    try:
        record = fusion if isinstance(fusion, FusionParameters) else FusionParameters.from_dict(fusion)
        resolved = record.weights_for([m.name for m in models]).tolist() if models is not None else None
    except ValueError as exc:
        raise SegmentationInputError(str(exc)) from None
    return _FusionChoice(
        resolved, record.confidence, f"fitted ({record.method})", record.flow_threshold, record.cellprob_threshold
    )


def _as_field(image: np.ndarray, n_models: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[np.newaxis]
    if image.ndim != 3:
        raise SegmentationInputError(f"a field must be (channels, Y, X), got shape {image.shape}")
    if n_models != image.shape[0]:
        raise SegmentationInputError(
            f"the field has {image.shape[0]} channels but {n_models} channel models were given: "
            "give one model per channel, in channel order"
        )
    return image


def _masks_from_channel_maps(
    channel_maps: list[ChannelMaps],
    models: Sequence[ChannelModel],
    *,
    method: str,
    flow_threshold: float | None,
    cellprob_threshold: float | None,
    min_size: int,
    weights: Sequence[float] | None,
    fusion_params: dict | None,
    mask_device,
    timings: dict[str, float],
    fusion: FusionParameters | dict | None = None,
) -> SegmentationResult:
    """Fused labels from every channel's maps (Flow Fusion or a label-fusion method), and the
    settings actually used."""
    choice = _check_options(method, weights, fusion_params, fusion, models)
    if method == "flow_fusion":
        tic = time.perf_counter()
        fused = fuse_maps(channel_maps, choice.weights, choice.confidence)
        timings["fuse"] = time.perf_counter() - tic
        tic = time.perf_counter()
        diameter, diam_mean = reconstruction_size(models)
        used_flow = choice.flow_threshold if flow_threshold is None else flow_threshold
        used_cellprob = choice.cellprob_threshold if cellprob_threshold is None else cellprob_threshold
        labels = masks_from_maps(
            fused,
            diameter=diameter,
            diam_mean=diam_mean,
            flow_threshold=used_flow,
            cellprob_threshold=used_cellprob,
            min_size=min_size,
            device=mask_device,
        )
        timings["masks"] = time.perf_counter() - tic
        norm = [float(w) for w in (choice.weights if choice.weights is not None else [1.0] * len(models))]
        settings: dict[str, Any] = {
            "method": method,
            "channels": [m.name for m in models],
            "weights": [round(w / sum(norm), 6) for w in norm],
            "confidence": choice.confidence,
            "flow_threshold": float(used_flow or 0.0),
            "cellprob_threshold": float(used_cellprob),
            "diameter": diameter,
            "weights_source": choice.source,
        }
        return SegmentationResult(labels, channel_maps, fused, None, timings, settings)

    tic = time.perf_counter()
    channel_flows = [m.own_flow_threshold if flow_threshold is None else flow_threshold for m in models]
    channel_cellprobs = [m.own_cellprob_threshold if cellprob_threshold is None else cellprob_threshold for m in models]
    channel_labels = [
        masks_from_maps(
            maps,
            diameter=m.diameter,
            diam_mean=m.diam_mean,
            flow_threshold=channel_flow,
            cellprob_threshold=channel_cellprob,
            min_size=min_size,
            device=mask_device,
        )
        for maps, m, channel_flow, channel_cellprob in zip(
            channel_maps, models, channel_flows, channel_cellprobs, strict=True
        )
    ]
    timings["masks"] = time.perf_counter() - tic
    tic = time.perf_counter()
    params = {"min_size": min_size, **(fusion_params or {})}
    labels = fuse_labels(channel_labels, method, **params)
    timings["fuse"] = time.perf_counter() - tic
    settings = {
        "method": method,
        "channels": [m.name for m in models],
        "flow_thresholds": [float(f or 0.0) for f in channel_flows],
        "cellprob_thresholds": [float(c) for c in channel_cellprobs],
        # One value when the channels share it (the usual case), as Flow Fusion records it.
        "cellprob_threshold": float(channel_cellprobs[0]) if len(set(channel_cellprobs)) == 1 else None,
        "fusion_params": params,
        "diameters": [m.diameter for m in models],
    }
    return SegmentationResult(labels, channel_maps, None, channel_labels, timings, settings)


def segment_field(
    image: np.ndarray,
    channel_models: Sequence[ChannelModel],
    *,
    method: str = "flow_fusion",
    normalizations: Normalization | Sequence[Normalization] | None = None,
    flow_threshold: float | None = None,
    cellprob_threshold: float | None = None,
    min_size: int = 15,
    tile: bool = False,
    weights: Sequence[float] | None = None,
    fusion_params: dict | None = None,
    fusion: FusionParameters | dict | None = None,
    precision: str = "fp32",
    mask_device=None,
    checkpoint: Callable[[], None] | None = None,
) -> SegmentationResult:
    """Segment a (K, Y, X) field, channel k through ``channel_models[k]``.

    ``method``: one of ``FUSION_METHODS``. ``flow_threshold`` None means the right default for
    the maps: ``FUSED_FLOW_THRESHOLD`` for maps fused from two or more channels; for a channel's
    own maps (one channel, or each channel before label fusion) the model's stored threshold, else
    Cellpose's 0.4. ``weights`` weigh channels in Flow Fusion; ``fusion_params`` go to
    ``fuse_labels``. ``fusion``: fitted fusion parameters (``FusionParameters`` or its dict) for
    exactly these channels (matched by the models' names): their weights, confidence mode and
    thresholds are used; an explicit ``flow_threshold`` / ``cellprob_threshold`` still wins.
    ``result.settings`` records what was used. ``tile=False`` runs each channel untiled (fast);
    ``tile=True`` reproduces Cellpose's tiling. The nets run on their own device in ``precision``
    (``app.science.device``); masks are reconstructed on ``mask_device`` (default the CPU).
    ``checkpoint`` is called between channels (a job's cancellation point: it raises to stop).
    For many fields, ``segment_fields`` batches and overlaps the stages.
    """
    started = time.perf_counter()
    models = list(channel_models)
    _check_options(method, weights, fusion_params, fusion, models)
    image = _as_field(image, len(models))

    timings: dict[str, float] = {}
    tic = time.perf_counter()
    channel_maps = predict_maps_multi(
        [m.net for m in models],
        image,
        diameter=[m.diameter for m in models],
        normalizations=normalizations,
        tile=tile,
        precision=precision,
        checkpoint=checkpoint,
    )
    timings["maps"] = time.perf_counter() - tic
    result = _masks_from_channel_maps(
        channel_maps,
        models,
        method=method,
        flow_threshold=flow_threshold,
        cellprob_threshold=cellprob_threshold,
        min_size=min_size,
        weights=weights,
        fusion_params=fusion_params,
        mask_device=mask_device,
        timings=timings,
        fusion=fusion,
    )
    timings["total"] = time.perf_counter() - started
    return result
