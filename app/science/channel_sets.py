"""Choose the channels to fuse: score the fusion over every non-empty subset of channels.

Each channel's maps are computed once per image (by the caller, e.g. ``predict_maps_multi``);
per subset only the fusion and the mask reconstruction run. For K channels that is 2**K - 1
reconstructions per image, which is cheap next to one network pass (15 subsets for 4 channels).

>>> SubsetScore(("cyto",), f1=0.8, precision=0.9, recall=0.72, jaccard=0.7, map_50_95=0.5).channels
('cyto',)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.science.flow_fusion import FUSED_FLOW_THRESHOLD, flow_fusion
from app.science.label_fusion import FUSION_METHODS, fuse_labels
from app.science.metrics import score_set

#: Metrics a subset can be ranked by (all: higher is better).
RANKING_METRICS: tuple[str, ...] = ("f1", "precision", "recall", "jaccard", "map_50_95")


class ChannelSetError(ValueError):
    """Inputs for channel-subset ranking that do not fit together."""


@dataclass(frozen=True)
class SubsetScore:
    """Pooled scores of one channel subset over the evaluation images."""

    channels: tuple[str, ...]
    f1: float
    precision: float
    recall: float
    jaccard: float
    map_50_95: float


def _maps_array(maps) -> np.ndarray:
    return np.asarray(getattr(maps, "maps", maps))


def rank_channel_subsets(
    channel_maps_per_image: Sequence[Sequence],
    truths: Sequence[np.ndarray],
    channel_names: Sequence[str],
    *,
    diameter: float,
    diam_mean: float,
    method: str = "flow_fusion",
    metric: str = "f1",
    flow_threshold: float | None = None,
    cellprob_threshold: float = 0.0,
    min_size: int = 15,
    fusion_params: dict | None = None,
    max_channels: int | None = None,
) -> list[SubsetScore]:
    """Every non-empty channel subset scored against ``truths``, best first.

    ``channel_maps_per_image[i][k]`` is image i's channel k maps (ChannelMaps or (3, Y, X)).
    Ties on ``metric`` go to fewer channels, then to the earlier channels. ``flow_threshold`` None
    means ``FUSED_FLOW_THRESHOLD`` for Flow Fusion and Cellpose's 0.4 for the per-channel masks of
    label fusion (which are computed once per image and channel, then fused per subset).
    """
    from app.science.backbone import masks_from_maps  # the torch/Cellpose part, only when scoring

    if method not in FUSION_METHODS:
        raise ChannelSetError(f"unknown fusion method {method!r}; valid methods: {', '.join(FUSION_METHODS)}")
    if metric not in RANKING_METRICS:
        raise ChannelSetError(f"unknown metric {metric!r}; rank by one of: {', '.join(RANKING_METRICS)}")
    names = [str(n) for n in channel_names]
    if len(set(names)) != len(names) or not names:
        raise ChannelSetError(f"channel names must be non-empty and unique, got {names}")
    per_image = [list(maps) for maps in channel_maps_per_image]
    if len(per_image) != len(truths) or not per_image:
        raise ChannelSetError(f"got maps for {len(per_image)} images but {len(truths)} ground-truth label images")
    for index, maps in enumerate(per_image):
        if len(maps) != len(names):
            raise ChannelSetError(f"image {index} has maps for {len(maps)} channels, expected {len(names)} ({names})")
    largest = len(names) if max_channels is None else max(1, min(int(max_channels), len(names)))

    channel_labels: list[list[np.ndarray]] | None = None
    if method != "flow_fusion":
        channel_labels = [
            [
                masks_from_maps(
                    _maps_array(m),
                    diameter=diameter,
                    diam_mean=diam_mean,
                    flow_threshold=0.4 if flow_threshold is None else flow_threshold,
                    cellprob_threshold=cellprob_threshold,
                    min_size=min_size,
                )
                for m in maps
            ]
            for maps in per_image
        ]

    scored: list[tuple[tuple[float, int, tuple[int, ...]], SubsetScore]] = []
    for size in range(1, largest + 1):
        for subset in itertools.combinations(range(len(names)), size):
            predictions = []
            for i, maps in enumerate(per_image):
                if channel_labels is None:
                    predictions.append(
                        flow_fusion(
                            [_maps_array(maps[k]) for k in subset],
                            diameter=diameter,
                            diam_mean=diam_mean,
                            flow_threshold=FUSED_FLOW_THRESHOLD if flow_threshold is None else flow_threshold,
                            cellprob_threshold=cellprob_threshold,
                            min_size=min_size,
                        ).labels
                    )
                elif size == 1:
                    predictions.append(channel_labels[i][subset[0]])
                else:
                    params = {"min_size": min_size, **(fusion_params or {})}
                    predictions.append(fuse_labels([channel_labels[i][k] for k in subset], method, **params))
            scores = score_set(list(truths), predictions)
            record = SubsetScore(
                channels=tuple(names[k] for k in subset),
                f1=scores.f1,
                precision=scores.precision,
                recall=scores.recall,
                jaccard=scores.jaccard,
                map_50_95=scores.map_50_95,
            )
            scored.append(((-getattr(record, metric), size, subset), record))
    scored.sort(key=lambda item: item[0])
    return [record for _, record in scored]
