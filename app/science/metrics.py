"""Segmentation scores: binary Jaccard, instance matching, precision/recall/F1 and mAP.

Conventions (the same as Cellpose's ``metrics`` and StarDist's ``matching``):

- A label image is a 2-D integer array, 0 = background, any positive id = one object. Ids need not
  be consecutive.
- A predicted object matches a true object when their IoU is >= the threshold; matching is
  one-to-one (Hungarian assignment that maximises the number of matches, then their summed IoU).
  For thresholds above 0.5 the assignment is unique anyway (an object can overlap at most one
  other object by more than half of their union), so it is just counted.
- Average precision at one threshold is AP = TP / (TP + FP + FN) (the DSB2018 / Cellpose
  definition, not the area under a precision-recall curve). ``map_50_95`` is its mean over
  ``IOU_THRESHOLDS`` = 0.50, 0.55, ..., 0.95.
- Zero denominators: when an image has neither true nor predicted objects every score is 1.0
  (nothing to find and nothing found wrongly); otherwise a ratio with a zero denominator is 0.0
  (e.g. precision of an empty prediction on an image with cells).

Worked example (two true nuclei, three predicted objects)::

    true = [[1, 1, 0, 2, 2],        pred = [[3, 3, 0, 7, 0],
            [1, 1, 0, 2, 2]]                [3, 3, 0, 7, 9]]

    IoU(1, 3) = 4 / 4 = 1.0       -> match
    IoU(2, 7) = 2 / 4 = 0.5       -> match at threshold 0.5 (>=), not at 0.55
    IoU(2, 9) = 1 / 4 = 0.25      -> 9 is a false positive

    match(true, pred, 0.5):  tp 2, fp 1, fn 0, precision 2/3, recall 1, f1 0.8,
                             mean_matched_iou 0.75
    AP at 0.5 = 2 / (2 + 1 + 0) = 0.667; AP at 0.55..0.95 = 1 / (1 + 2 + 1) = 0.25
    jaccard: foreground intersection 7, union 8 -> 0.875
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

#: The IoU thresholds of the DSB2018 / COCO-style mAP: 0.50, 0.55, ..., 0.95 (10 values).
IOU_THRESHOLDS: np.ndarray = np.arange(0.5, 1.0, 0.05)

#: Above this many cells a dense (max_true+1) x (max_pred+1) overlap table is too big; ids are
#: then compressed to consecutive ones first (a sort, slower but bounded in memory).
_DENSE_TABLE_LIMIT = 4_000_000


class LabelImageError(ValueError):
    """A label image that cannot be scored (wrong shape, dtype or negative ids)."""


@dataclass(frozen=True)
class Matching:
    """One-to-one matching of true and predicted objects at one IoU threshold."""

    threshold: float
    tp: int
    fp: int
    fn: int
    n_true: int
    n_pred: int
    precision: float
    recall: float
    f1: float
    #: Mean IoU over the matched pairs (0.0 when nothing matched, 1.0 when both images are empty).
    mean_matched_iou: float

    @property
    def average_precision(self) -> float:
        """TP / (TP + FP + FN) at this threshold."""
        return _ratio(self.tp, self.tp + self.fp + self.fn, self.n_true + self.n_pred == 0)


@dataclass(frozen=True)
class SegmentationScores:
    """The scores CellFuse reports for one image or a pooled set of images.

    ``precision``, ``recall``, ``f1``, ``tp``, ``fp``, ``fn`` are at IoU >= 0.5;
    ``ap`` holds AP = TP/(TP+FP+FN) at each of ``thresholds``; ``map_50_95`` is their mean.
    """

    jaccard: float
    precision: float
    recall: float
    f1: float
    map_50_95: float
    tp: int
    fp: int
    fn: int
    n_true: int
    n_pred: int
    thresholds: tuple[float, ...]
    ap: tuple[float, ...]

    def as_dict(self) -> dict[str, float | int | list[float]]:
        """JSON-ready: plain floats, ints and lists (thresholds rounded to 2 decimals)."""
        record = asdict(self)
        record["thresholds"] = [round(float(t), 2) for t in self.thresholds]
        record["ap"] = [float(a) for a in self.ap]
        return record


# --------------------------------------------------------------------------------------------
# Overlap and IoU
# --------------------------------------------------------------------------------------------


def _check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise LabelImageError(f"{name} must be a 2-D label image (Y, X); got shape {labels.shape}")
    if labels.dtype == bool:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise LabelImageError(f"{name} must hold integer object ids (0 = background); got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise LabelImageError(f"{name} has negative ids; object ids must be >= 0 (0 = background)")
    return labels.astype(np.int64, copy=False)


def _check_pair(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    true = _check_labels(true, "true labels")
    pred = _check_labels(pred, "predicted labels")
    if true.shape != pred.shape:
        raise LabelImageError(f"true and predicted labels differ in shape: {true.shape} vs {pred.shape}")
    return true, pred


def _compress(flat: np.ndarray) -> tuple[np.ndarray, int]:
    """Map ids to 0..n (0 stays background) so the overlap table is small."""
    ids, inverse = np.unique(flat, return_inverse=True)
    if ids[0] != 0:  # no background pixel: shift so that 0 still means background
        inverse = inverse + 1
        return inverse, len(ids)
    return inverse, len(ids) - 1


def overlap_table(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel counts shared by each (true, pred) object pair.

    Returns ``(overlap, true_ids, pred_ids)``: ``overlap[i, j]`` is the number of pixels with true
    id ``true_ids[i]`` and predicted id ``pred_ids[j]``; index 0 of both axes is background, so row
    and column sums give the objects' areas. Only ids present in the images appear.
    """
    true, pred = _check_pair(true, pred)
    t = true.ravel()
    p = pred.ravel()
    t_max = int(t.max(initial=0))
    p_max = int(p.max(initial=0))
    if (t_max + 1) * (p_max + 1) > _DENSE_TABLE_LIMIT:
        t, t_max = _compress(t)
        p, p_max = _compress(p)
        true_lookup = np.unique(true)
        pred_lookup = np.unique(pred)
    else:
        true_lookup = pred_lookup = None
    # one bincount over paired ids: id pair (a, b) -> a * (p_max + 1) + b
    table = np.bincount(t * (p_max + 1) + p, minlength=(t_max + 1) * (p_max + 1))
    table = table.reshape(t_max + 1, p_max + 1)
    true_ids = np.arange(t_max + 1)
    pred_ids = np.arange(p_max + 1)
    if true_lookup is not None:
        true_ids = np.concatenate([[0], true_lookup[true_lookup > 0]])
        pred_ids = np.concatenate([[0], pred_lookup[pred_lookup > 0]])
    # drop ids that do not occur (non-consecutive labels), keep background at index 0
    keep_t = table.sum(axis=1) > 0
    keep_p = table.sum(axis=0) > 0
    keep_t[0] = keep_p[0] = True
    return table[keep_t][:, keep_p], true_ids[keep_t], pred_ids[keep_p]


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IoU of every true object with every predicted object.

    Returns ``(iou, true_ids, pred_ids)`` with ``iou`` of shape (n_true, n_pred), background
    excluded; rows follow ``true_ids`` and columns ``pred_ids`` (sorted, present ids only).

    >>> iou, t, p = iou_matrix(np.array([[1, 1, 0, 0]]), np.array([[0, 5, 5, 0]]))
    >>> float(iou[0, 0]), t.tolist(), p.tolist()
    (0.3333333333333333, [1], [5])
    """
    overlap, true_ids, pred_ids = overlap_table(true, pred)
    iou = _iou_from_overlap(overlap)
    return iou, true_ids[1:], pred_ids[1:]


def _iou_from_overlap(overlap: np.ndarray) -> np.ndarray:
    area_true = overlap.sum(axis=1, keepdims=True)[1:]
    area_pred = overlap.sum(axis=0, keepdims=True)[:, 1:]
    inter = overlap[1:, 1:].astype(np.float64)
    union = area_true + area_pred - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


def _matched_ious(iou: np.ndarray, threshold: float) -> np.ndarray:
    """IoUs of the one-to-one matched pairs with IoU >= threshold."""
    if iou.size == 0:
        return np.zeros(0)
    eligible = iou >= threshold
    if threshold > 0.5:
        # IoU > 1/2 is exclusive: each object has at most one such partner, so counting is exact
        return iou[eligible]
    rows = np.flatnonzero(eligible.any(axis=1))
    cols = np.flatnonzero(eligible.any(axis=0))
    if rows.size == 0:
        return np.zeros(0)
    sub = iou[np.ix_(rows, cols)]
    sub_ok = sub >= threshold
    # maximise the number of matches first, then their summed IoU (the IoU term adds < 1 in total)
    gain = sub_ok * (1.0 + sub / (min(sub.shape) + 1.0))
    r, c = linear_sum_assignment(-gain)
    ok = sub_ok[r, c]
    return sub[r[ok], c[ok]]


def _matching_from_iou(iou: np.ndarray, threshold: float) -> Matching:
    n_true, n_pred = iou.shape
    matched = _matched_ious(iou, threshold)
    tp = int(matched.size)
    fp = n_pred - tp
    fn = n_true - tp
    both_empty = n_true == 0 and n_pred == 0
    return Matching(
        threshold=float(threshold),
        tp=tp,
        fp=fp,
        fn=fn,
        n_true=n_true,
        n_pred=n_pred,
        precision=_ratio(tp, n_pred, both_empty),
        recall=_ratio(tp, n_true, both_empty),
        f1=_ratio(2 * tp, 2 * tp + fp + fn, both_empty),
        mean_matched_iou=_ratio(float(matched.sum()), tp, both_empty),
    )


def match(true: np.ndarray, pred: np.ndarray, threshold: float = 0.5) -> Matching:
    """One-to-one matching of objects at IoU >= ``threshold``.

    >>> m = match(np.array([[1, 1, 0, 2, 2]]), np.array([[3, 3, 0, 7, 9]]))
    >>> m.tp, m.fp, m.fn, round(m.f1, 3)
    (2, 1, 0, 0.8)
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"IoU threshold must be in (0, 1]; got {threshold}")
    iou, _, _ = iou_matrix(true, pred)
    return _matching_from_iou(iou, threshold)


def jaccard(true: np.ndarray, pred: np.ndarray) -> float:
    """Binary foreground IoU (every object merged); 1.0 when both images are empty."""
    true, pred = _check_pair(true, pred)
    inter, union = _foreground_overlap(true, pred)
    return _ratio(inter, union, union == 0)


def _foreground_overlap(true: np.ndarray, pred: np.ndarray) -> tuple[int, int]:
    t = true > 0
    p = pred > 0
    return int(np.count_nonzero(t & p)), int(np.count_nonzero(t | p))


def _counts(iou: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_true, n_pred = iou.shape
    tp = np.array([_matched_ious(iou, float(t)).size for t in thresholds], dtype=np.int64)
    return tp, n_pred - tp, n_true - tp


def _check_thresholds(thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    if thresholds.size == 0 or np.any((thresholds <= 0) | (thresholds > 1)):
        raise ValueError(f"IoU thresholds must be a non-empty list of values in (0, 1]; got {thresholds}")
    return thresholds


def average_precision(
    true: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] | np.ndarray = IOU_THRESHOLDS
) -> np.ndarray:
    """AP = TP / (TP + FP + FN) at each threshold (float64, one value per threshold).

    >>> average_precision(np.array([[1, 1, 0, 2, 2]]), np.array([[3, 3, 0, 7, 9]]), [0.5, 0.6])
    array([0.66666667, 0.25      ])
    """
    thresholds = _check_thresholds(thresholds)
    iou, _, _ = iou_matrix(true, pred)
    tp, fp, fn = _counts(iou, thresholds)
    return _ap(tp, fp, fn)


def _ap(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    den = tp + fp + fn
    # den == 0 only when there are no objects at all: a perfect (empty) answer
    return np.where(den > 0, tp / np.maximum(den, 1), 1.0).astype(np.float64)


def _scores(
    tp: np.ndarray,
    fp: np.ndarray,
    fn: np.ndarray,
    inter: int,
    union: int,
    thresholds: np.ndarray,
) -> SegmentationScores:
    # index of 0.5 if present, else the first threshold: precision/recall/F1 are "at 0.5"
    at = int(np.argmin(np.abs(thresholds - 0.5)))
    n_true = int(tp[at] + fn[at])
    n_pred = int(tp[at] + fp[at])
    both_empty = n_true == 0 and n_pred == 0
    t, f_p, f_n = int(tp[at]), int(fp[at]), int(fn[at])
    ap = _ap(tp, fp, fn)
    return SegmentationScores(
        jaccard=_ratio(inter, union, union == 0),
        precision=_ratio(t, n_pred, both_empty),
        recall=_ratio(t, n_true, both_empty),
        f1=_ratio(2 * t, 2 * t + f_p + f_n, both_empty),
        map_50_95=float(ap.mean()),
        tp=t,
        fp=f_p,
        fn=f_n,
        n_true=n_true,
        n_pred=n_pred,
        thresholds=tuple(float(x) for x in thresholds),
        ap=tuple(float(x) for x in ap),
    )


def score(
    true: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] | np.ndarray = IOU_THRESHOLDS
) -> SegmentationScores:
    """All of CellFuse's scores for one image (precision/recall/F1/counts at IoU >= 0.5)."""
    thresholds = _check_thresholds(thresholds)
    true, pred = _check_pair(true, pred)
    iou, _, _ = iou_matrix(true, pred)
    tp, fp, fn = _counts(iou, thresholds)
    inter, union = _foreground_overlap(true, pred)
    return _scores(tp, fp, fn, inter, union, thresholds)


def score_set(
    trues: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    thresholds: Sequence[float] | np.ndarray = IOU_THRESHOLDS,
) -> SegmentationScores:
    """Scores pooled over a set of images.

    TP, FP and FN are summed over images per threshold before any ratio is taken (so an image with
    many cells weighs more than one with few); Jaccard is the summed foreground intersection over
    the summed union.
    """
    if len(trues) != len(preds):
        raise ValueError(f"got {len(trues)} true label images but {len(preds)} predictions")
    if len(trues) == 0:
        raise ValueError("cannot score an empty set of images")
    thresholds = _check_thresholds(thresholds)
    tp = np.zeros(thresholds.size, np.int64)
    fp = np.zeros_like(tp)
    fn = np.zeros_like(tp)
    inter = union = 0
    for index, (true, pred) in enumerate(zip(trues, preds, strict=True)):
        try:
            true, pred = _check_pair(true, pred)
        except LabelImageError as error:
            raise LabelImageError(f"image {index}: {error}") from None
        iou, _, _ = iou_matrix(true, pred)
        t, f_p, f_n = _counts(iou, thresholds)
        tp += t
        fp += f_p
        fn += f_n
        i, u = _foreground_overlap(true, pred)
        inter += i
        union += u
    return _scores(tp, fp, fn, inter, union, thresholds)


def pooled_f1_interval(
    matchings: Sequence[Matching], *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Pooled F1 over fields and a percentile bootstrap interval, resampling whole fields.

    Fields are the unit of replication (cells of one field share its acquisition), so the interval
    says how much the figure would move on another set of fields like these.

    >>> from types import SimpleNamespace
    >>> pooled_f1_interval([SimpleNamespace(tp=8, fp=2, fn=0)] * 3, n_boot=50)
    (0.8889, 0.8889, 0.8889)
    """
    tp = np.array([m.tp for m in matchings], np.float64)
    fp = np.array([m.fp for m in matchings], np.float64)
    fn = np.array([m.fn for m in matchings], np.float64)

    def f1(index: np.ndarray) -> float:
        den = 2 * tp[index].sum() + fp[index].sum() + fn[index].sum()
        return float(2 * tp[index].sum() / den) if den else 1.0

    if not len(matchings):
        raise ValueError("no fields to score")
    rng = np.random.default_rng(seed)
    boots = [f1(rng.integers(0, len(tp), len(tp))) for _ in range(n_boot)]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha])
    return round(f1(np.arange(len(tp))), 4), round(float(lo), 4), round(float(hi), 4)
