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
from dataclasses import dataclass, replace

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
    #: Bootstrap 95 % interval of the pooled F1 over resampled fields (None with one field).
    f1_interval: tuple[float, float] | None = None
    #: Whether the best subset is NOT better in ``gain_confidence`` of paired bootstrap resamples.
    within_noise: bool = True
    #: Fraction of paired bootstrap resamples in which the top-ranked subset's F1 is higher.
    p_best_better: float = 0.0
    n_fields: int = 0


#: The top subset must beat another in this share of paired bootstrap resamples to count as better.
GAIN_CONFIDENCE = 0.9


def choose_channel_set(ranking: Sequence[SubsetScore]) -> tuple[str, ...]:
    """The smallest subset within noise of the best (``rank_channel_subsets`` marks them); among
    equally small ones the higher-ranked. Fewer reporters to image and to trust when the data
    cannot tell the sets apart."""
    if not ranking:
        raise ChannelSetError("no ranked subsets to choose from")
    candidates = [(len(r.channels), i) for i, r in enumerate(ranking) if r.within_noise] or [(0, 0)]
    return ranking[min(candidates)[1]].channels


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
    n_boot: int = 2000,
    gain_confidence: float = GAIN_CONFIDENCE,
    seed: int = 0,
) -> list[SubsetScore]:
    """Every non-empty channel subset scored against ``truths``, best first.

    ``channel_maps_per_image[i][k]`` is image i's channel k maps (ChannelMaps or (3, Y, X)).
    Ties on ``metric`` go to fewer channels, then to the earlier channels. ``flow_threshold`` None
    means ``FUSED_FLOW_THRESHOLD`` for Flow Fusion and Cellpose's 0.4 for the per-channel masks of
    label fusion (which are computed once per image and channel, then fused per subset).

    Each subset's pooled F1 gets a bootstrap 95 % interval over the images (fields resampled with
    replacement, the same resamples for every subset, so comparisons are paired); a subset is
    ``within_noise`` of the top one unless the top one's F1 is higher in ``gain_confidence`` of
    the resamples. ``choose_channel_set`` picks the smallest such subset.
    """
    from app.science.backbone import (
        masks_from_maps,  # the torch/Cellpose part, only when scoring
    )
    from app.science.fusion_fitting import field_counts, interval, pooled_f1

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
    per_field_counts: list[np.ndarray] = []
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
            per_field_counts.append(np.array([field_counts(t, p) for t, p in zip(truths, predictions)]))
            record = SubsetScore(
                channels=tuple(names[k] for k in subset),
                f1=scores.f1,
                precision=scores.precision,
                recall=scores.recall,
                jaccard=scores.jaccard,
                map_50_95=scores.map_50_95,
            )
            scored.append(((-getattr(record, metric), size, subset), record))
    n_fields = len(per_image)
    order = sorted(range(len(scored)), key=lambda j: scored[j][0])
    if n_fields < 2:
        return [replace(scored[j][1], n_fields=n_fields, within_noise=(j == order[0])) for j in order]
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, n_fields, size=(n_boot, n_fields))
    boot = np.stack([pooled_f1(counts[resamples].sum(axis=1)) for counts in per_field_counts])  # (subsets, n_boot)
    top = order[0]
    ranked = []
    for j in order:
        p_better = float(np.mean(boot[top] > boot[j])) if j != top else 0.0
        ranked.append(
            replace(
                scored[j][1],
                f1_interval=interval(boot[j]),
                within_noise=p_better < gain_confidence,
                p_best_better=p_better,
                n_fields=n_fields,
            )
        )
    return ranked
