"""Learned Flow Fusion: fit how far to trust each channel of a set, on annotated validation fields.

Equal-weight Flow Fusion dilutes a strong reporter with weak ones. Here the channel weights, the
fused flow-error and cell-probability thresholds and, optionally, a per-pixel confidence weighting
are chosen on validation fields, with a rule that resists over-fitting a handful of fields:

1. **Candidates.** Three methods, simplest first (``FUSION_PARAMETER_METHODS``):
   ``equal`` (equal weights), ``weights`` (one weight per channel from a coarse grid on the
   simplex that holds the equal weights, every channel alone (one-hot: the fallback to the best
   channel) and every pair) and ``per_pixel`` (equal weights, each channel's maps weighted per
   pixel by its confidence, ``flow_fusion.CONFIDENCE_MODES``). Each is crossed with a grid of
   flow-error and cell-probability thresholds. The network maps are computed once per field by
   the caller; a candidate only reruns the mask reconstruction (``masks_for_flow_thresholds``:
   one dynamics run per weighting and cell-probability threshold, all flow thresholds at once).
2. **Cross-validation over fields.** For every method, leave one field out: the method's best
   candidate on the other fields (pooled F1 at IoU 0.5) is scored on the held-out field; the
   held-out counts pooled over all fields give the method's CV F1.
3. **Prefer the simpler method unless the gain exceeds the noise.** A paired bootstrap over fields
   resamples the held-out counts; a more complex method replaces the current choice only when its
   CV F1 is higher and higher in at least ``gain_confidence`` (0.9) of the bootstrap samples.
4. The chosen method's best candidate on all validation fields is the result: a JSON-able
   ``FusionParameters`` record with its CV F1 and bootstrap 95 % interval.

>>> len(simplex_weights(3, 3)), simplex_weights(2, 2)
(10, [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)])
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.science.flow_fusion import (
    CONFIDENCE_MODES,
    FUSED_FLOW_THRESHOLD,
    FusionInputError,
    FusionParameters,
    fuse_maps,
)

#: Flow-error thresholds searched (0 = the check off; 0.4 is Cellpose's single-channel default).
FLOW_THRESHOLDS: tuple[float, ...] = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2)
#: Cell-probability logit thresholds searched (0 is Cellpose's default).
CELLPROB_THRESHOLDS: tuple[float, ...] = (-1.0, 0.0, 1.0)
#: More weight vectors than this and the simplex grid falls back to a reduced family.
MAX_WEIGHT_VECTORS = 64


class FusionFittingError(ValueError):
    """Maps and truths that fusion parameters cannot be fitted on."""


def simplex_weights(k: int, resolution: int) -> list[tuple[float, ...]]:
    """All weight vectors with entries in multiples of 1/resolution summing to 1 (one-hots first)."""
    if k < 1 or resolution < 1:
        raise FusionFittingError("need at least one channel and a resolution >= 1")
    vectors = []
    for bars in itertools.combinations(range(resolution + k - 1), k - 1):
        parts, previous = [], -1
        for bar in (*bars, resolution + k - 1):
            parts.append(bar - previous - 1)
            previous = bar
        vectors.append(tuple(p / resolution for p in parts))
    vectors.sort(key=lambda v: (-max(v), [-x for x in v]))
    return vectors


def weight_grid(k: int) -> list[tuple[float, ...]]:
    """The channel-weight candidates for K channels, equal weights first, then the one-hots.

    A simplex grid fine enough to hold the equal weights (resolution K, at least 4 for K = 2);
    for large K (grid over ``MAX_WEIGHT_VECTORS``) the one-hots, all pairs, all leave-one-outs.
    """
    equal = tuple([1.0 / k] * k)
    if k == 1:
        return [(1.0,)]
    resolution = 4 if k == 2 else k
    grid = simplex_weights(k, resolution)
    if len(grid) > MAX_WEIGHT_VECTORS:
        eye = np.eye(k)
        grid = [tuple(row) for row in eye]
        grid += [tuple((eye[i] + eye[j]) / 2) for i, j in itertools.combinations(range(k), 2)]
        grid += [tuple((1.0 - eye[i]) / (k - 1)) for i in range(k)]
    one_hots = [v for v in grid if max(v) == 1.0]
    rest = [v for v in grid if max(v) < 1.0 and not np.allclose(v, equal)]
    return [equal, *one_hots, *rest]


@dataclass(frozen=True)
class Candidate:
    method: str
    weights: tuple[float, ...]
    confidence: str | None
    flow_threshold: float
    cellprob_threshold: float


def pooled_f1(counts: np.ndarray) -> np.ndarray:
    """F1 from (..., 3) [tp, fp, fn] counts; 1.0 where there is nothing to find and nothing found."""
    counts = np.asarray(counts, dtype=np.float64)
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), 1.0)


def field_counts(truth: np.ndarray, prediction: np.ndarray) -> tuple[int, int, int]:
    """(tp, fp, fn) at IoU >= 0.5 for one field."""
    from app.science.metrics import match

    m = match(truth, prediction, 0.5)
    return m.tp, m.fp, m.fn


def bootstrap_f1(counts: np.ndarray, *, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """Pooled F1 of (n_fields, 3) per-field counts over ``n_boot`` resamples of the fields."""
    counts = np.asarray(counts)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(counts), size=(n_boot, len(counts)))
    return pooled_f1(counts[idx].sum(axis=1))


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples."""
    low, high = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def _maps_arrays(field_maps: Sequence) -> list[np.ndarray]:
    return [np.asarray(getattr(m, "maps", m), dtype=np.float32) for m in field_maps]


def threshold_table(
    maps_per_field: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    *,
    diameter: float,
    diam_mean: float,
    flow_thresholds: Sequence[float] = FLOW_THRESHOLDS,
    cellprob_thresholds: Sequence[float] = CELLPROB_THRESHOLDS,
    min_size: int = 15,
) -> np.ndarray:
    """Per-field counts (n_cellprob, n_flow, n_fields, 3) of one map source (fused or single)."""
    from app.science.backbone import masks_for_flow_thresholds

    table = np.zeros((len(cellprob_thresholds), len(flow_thresholds), len(truths), 3), np.int64)
    for i, (maps, truth) in enumerate(zip(maps_per_field, truths)):
        for c, cellprob in enumerate(cellprob_thresholds):
            masks = masks_for_flow_thresholds(
                maps,
                diameter=diameter,
                diam_mean=diam_mean,
                flow_thresholds=flow_thresholds,
                cellprob_threshold=cellprob,
                min_size=min_size,
            )
            for f, labels in enumerate(masks):
                table[c, f, i] = field_counts(truth, labels)
    return table


@dataclass(frozen=True)
class ThresholdFit:
    """The best (flow, cell-probability) thresholds of one map source on a set of fields."""

    flow_threshold: float
    cellprob_threshold: float
    f1: float


def fit_thresholds(
    maps_per_field: Sequence,
    truths: Sequence[np.ndarray],
    *,
    diameter: float,
    diam_mean: float,
    flow_thresholds: Sequence[float] = FLOW_THRESHOLDS,
    cellprob_thresholds: Sequence[float] = CELLPROB_THRESHOLDS,
    min_size: int = 15,
) -> ThresholdFit:
    """Pooled-F1-best thresholds for one model's (or one fused) maps: a single channel alone, or a
    joint K-channel model, gets the same threshold search as the fusion it is compared with."""
    maps = [np.asarray(getattr(m, "maps", m), np.float32) for m in maps_per_field]
    table = threshold_table(
        maps,
        truths,
        diameter=diameter,
        diam_mean=diam_mean,
        flow_thresholds=flow_thresholds,
        cellprob_thresholds=cellprob_thresholds,
        min_size=min_size,
    )
    scores = pooled_f1(table.sum(axis=2))
    c, f = (int(i) for i in np.unravel_index(int(np.argmax(scores)), scores.shape))
    return ThresholdFit(float(flow_thresholds[f]), float(cellprob_thresholds[c]), float(scores[c, f]))


def _loo_heldout(counts: np.ndarray) -> np.ndarray:
    """Leave-one-field-out: (n_cand, n_fields, 3) -> the held-out field's counts (n_fields, 3)
    of the candidate best on the other fields (ties: the earlier, simpler candidate)."""
    totals = counts.sum(axis=1)
    n_fields = counts.shape[1]
    held = np.zeros((n_fields, 3), counts.dtype)
    for i in range(n_fields):
        best = int(np.argmax(pooled_f1(totals - counts[:, i])))
        held[i] = counts[best, i]
    return held


def fit_fusion_parameters(
    maps_per_field: Sequence[Sequence],
    truths: Sequence[np.ndarray],
    channel_names: Sequence[str],
    *,
    diameter: float,
    diam_mean: float,
    methods: Sequence[str] = ("equal", "weights", "per_pixel"),
    flow_thresholds: Sequence[float] = FLOW_THRESHOLDS,
    cellprob_thresholds: Sequence[float] = CELLPROB_THRESHOLDS,
    confidence_modes: Sequence[str] = CONFIDENCE_MODES,
    gain_confidence: float = 0.9,
    n_boot: int = 2000,
    min_size: int = 15,
    seed: int = 0,
) -> FusionParameters:
    """Fit the fusion of one channel set on validation fields (see the module docstring).

    ``maps_per_field[i][k]``: field i's channel k maps (ChannelMaps or (3, Y, X)); ``truths[i]``:
    field i's label image. With one field there is nothing to cross-validate: the equal-weight
    thresholds are fitted and no interval is given.
    """
    from app.science.backbone import masks_for_flow_thresholds

    names = tuple(str(n) for n in channel_names)
    per_field = [_maps_arrays(m) for m in maps_per_field]
    if not per_field or len(per_field) != len(truths):
        raise FusionFittingError(f"got maps for {len(per_field)} fields and {len(truths)} label images")
    k = len(names)
    if k == 0 or len(set(names)) != k:
        raise FusionFittingError(f"channel names must be non-empty and unique, got {list(names)}")
    for i, maps in enumerate(per_field):
        if len(maps) != k:
            raise FusionFittingError(f"field {i} has maps for {len(maps)} channels, expected {k} ({list(names)})")
    unknown = [m for m in methods if m not in ("equal", "weights", "per_pixel")]
    if unknown or "equal" not in methods:
        raise FusionFittingError(f"methods must include 'equal' and come from equal/weights/per_pixel, got {methods}")
    if not 0.5 <= gain_confidence < 1.0:
        raise FusionFittingError(f"gain_confidence must be in [0.5, 1), got {gain_confidence}")
    flow_thresholds = tuple(float(t) for t in flow_thresholds)
    cellprob_thresholds = tuple(float(t) for t in cellprob_thresholds)
    if not flow_thresholds or not cellprob_thresholds:
        raise FusionFittingError("give at least one flow and one cell-probability threshold")

    equal = tuple([1.0 / k] * k)
    weightings: list[tuple[str, tuple[float, ...], str | None]] = [("equal", equal, None)]
    if "weights" in methods and k > 1:
        weightings += [("weights", w, None) for w in weight_grid(k)]
    if "per_pixel" in methods and k > 1:
        weightings += [("per_pixel", equal, mode) for mode in confidence_modes]

    # One reconstruction per (weighting, cell-probability threshold, field); the "weights" grid
    # starts with the equal vector, which is computed once and shared.
    cache: dict[tuple, np.ndarray] = {}
    candidates: list[Candidate] = []
    counts_rows: list[np.ndarray] = []
    for method, weights, confidence in weightings:
        key = (weights, confidence)
        if key not in cache:
            table = np.zeros((len(cellprob_thresholds), len(flow_thresholds), len(per_field), 3), np.int64)
            for i, (maps, truth) in enumerate(zip(per_field, truths)):
                fused = fuse_maps(maps, weights, confidence)
                for c, cellprob in enumerate(cellprob_thresholds):
                    masks = masks_for_flow_thresholds(
                        fused,
                        diameter=diameter,
                        diam_mean=diam_mean,
                        flow_thresholds=flow_thresholds,
                        cellprob_threshold=cellprob,
                        min_size=min_size,
                    )
                    for f, labels in enumerate(masks):
                        table[c, f, i] = field_counts(truth, labels)
            cache[key] = table
        table = cache[key]
        for c, cellprob in enumerate(cellprob_thresholds):
            for f, flow in enumerate(flow_thresholds):
                candidates.append(Candidate(method, weights, confidence, flow, cellprob))
                counts_rows.append(table[c, f])
    counts = np.stack(counts_rows)  # (n_candidates, n_fields, 3)
    n_fields = counts.shape[1]
    by_method = {
        m: np.array([j for j, c in enumerate(candidates) if c.method == m or (m == "weights" and c.method == "equal")])
        for m in ("equal", "weights", "per_pixel")
        if any(c.method == m for c in candidates)
    }
    details: dict = {
        "grid": {
            "flow_thresholds": list(flow_thresholds),
            "cellprob_thresholds": list(cellprob_thresholds),
            "weight_vectors": len({w for _, w, _ in weightings}),
            "confidence_modes": list(confidence_modes),
        },
        "rule": f"leave-one-field-out CV; a more complex method must beat the simpler one in >= "
        f"{gain_confidence:.0%} of {n_boot} paired bootstrap resamples of the fields",
        "methods": {},
    }

    chosen = "equal"
    if n_fields >= 2:
        rng_seed = seed
        held = {m: _loo_heldout(counts[idx]) for m, idx in by_method.items()}
        boots = {m: bootstrap_f1(h, n_boot=n_boot, seed=rng_seed) for m, h in held.items()}  # same resamples
        cv = {m: float(pooled_f1(h.sum(axis=0))) for m, h in held.items()}
        for m in by_method:
            details["methods"][m] = {"cv_f1": round(cv[m], 4), "cv_interval": [round(x, 4) for x in interval(boots[m])]}
        for m in ("weights", "per_pixel"):
            if m not in by_method:
                continue
            wins = float(np.mean(boots[m] > boots[chosen]))
            details["methods"][m]["p_better_than_" + chosen] = round(wins, 3)
            if cv[m] > cv[chosen] and wins >= gain_confidence:
                chosen = m
        cv_f1, cv_int = cv[chosen], interval(boots[chosen])
    else:
        cv_f1, cv_int = None, None

    idx = by_method[chosen]
    totals = pooled_f1(counts[idx].sum(axis=1))
    best = candidates[int(idx[int(np.argmax(totals))])]
    # Report the method that the best candidate really is (the equal vector inside "weights").
    method = best.method
    details["in_sample_f1"] = round(float(totals.max()), 4)
    singles = {}
    for j, name in enumerate(names):
        onehot = tuple(1.0 if i == j else 0.0 for i in range(k))
        sel = [n for n, c in enumerate(candidates) if c.weights == onehot and c.confidence is None]
        if sel:
            singles[name] = round(float(pooled_f1(counts[sel].sum(axis=1)).max()), 4)
    if singles:
        details["single_channel_best_f1"] = singles
    return FusionParameters(
        method=method,
        channels=names,
        weights=tuple(float(w) for w in best.weights),
        flow_threshold=best.flow_threshold,
        cellprob_threshold=best.cellprob_threshold,
        confidence=best.confidence,
        cv_f1=cv_f1,
        cv_interval=cv_int,
        n_fields=n_fields,
        details=details,
    )


def default_parameters(channel_names: Sequence[str]) -> FusionParameters:
    """Equal weights and the fixed fused thresholds: what Flow Fusion does without a fitted record."""
    names = tuple(str(n) for n in channel_names)
    if not names:
        raise FusionInputError("no channels")
    return FusionParameters("equal", names, tuple([1.0 / len(names)] * len(names)), FUSED_FLOW_THRESHOLD, 0.0)
