"""Tests for app.science.metrics: hand-worked cases and a cross-check against Cellpose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from app.science import metrics
from app.science.metrics import (
    IOU_THRESHOLDS,
    LabelImageError,
    average_precision,
    iou_matrix,
    jaccard,
    match,
    score,
    score_set,
)

# The docstring's worked example
TRUE = np.array([[1, 1, 0, 2, 2], [1, 1, 0, 2, 2]])
PRED = np.array([[3, 3, 0, 7, 0], [3, 3, 0, 7, 9]])


def test_thresholds_are_point_five_to_point_nine_five() -> None:
    assert IOU_THRESHOLDS.size == 10
    assert IOU_THRESHOLDS[0] == pytest.approx(0.5)
    assert IOU_THRESHOLDS[-1] == pytest.approx(0.95)


def test_iou_matrix_of_worked_example() -> None:
    iou, true_ids, pred_ids = iou_matrix(TRUE, PRED)
    assert true_ids.tolist() == [1, 2]
    assert pred_ids.tolist() == [3, 7, 9]
    np.testing.assert_allclose(iou, [[1.0, 0.0, 0.0], [0.0, 0.5, 0.25]])


def test_match_of_worked_example() -> None:
    m = match(TRUE, PRED, 0.5)
    assert (m.tp, m.fp, m.fn, m.n_true, m.n_pred) == (2, 1, 0, 2, 3)
    assert m.precision == pytest.approx(2 / 3)
    assert m.recall == 1.0
    assert m.f1 == pytest.approx(0.8)
    assert m.mean_matched_iou == pytest.approx(0.75)
    assert m.average_precision == pytest.approx(2 / 3)
    # IoU exactly 0.5 no longer matches above 0.5
    assert match(TRUE, PRED, 0.55).tp == 1


def test_average_precision_and_jaccard_of_worked_example() -> None:
    ap = average_precision(TRUE, PRED)
    np.testing.assert_allclose(ap, [2 / 3] + [0.25] * 9)
    assert jaccard(TRUE, PRED) == pytest.approx(7 / 8)


def test_score_of_worked_example_is_json_ready() -> None:
    s = score(TRUE, PRED)
    assert (s.tp, s.fp, s.fn, s.n_true, s.n_pred) == (2, 1, 0, 2, 3)
    assert s.map_50_95 == pytest.approx((2 / 3 + 9 * 0.25) / 10)
    record = json.loads(json.dumps(s.as_dict()))
    assert record["f1"] == pytest.approx(0.8)
    assert record["thresholds"][0] == 0.5 and record["thresholds"][-1] == 0.95
    assert len(record["ap"]) == 10


def test_one_to_one_when_two_predictions_tie_for_one_object() -> None:
    # true object of 2 pixels, each prediction covers one pixel: IoU 0.5 each, one match only
    true = np.array([[1, 1]])
    pred = np.array([[4, 5]])
    m = match(true, pred, 0.5)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)


def test_assignment_maximises_the_number_of_matches() -> None:
    # a greedy choice of the best IoU (true 1 <-> pred 1 at 0.6) would leave true 2 unmatched
    iou = np.array([[0.5, 0.5], [0.5, 0.0]])
    assert metrics._matched_ious(iou, 0.5).size == 2
    assert metrics._matched_ious(np.array([[0.6, 0.5], [0.5, 0.0]]), 0.5).size == 2


def test_ids_need_not_be_consecutive_and_large_ids_work() -> None:
    true = np.zeros((20, 20), np.int64)
    true[2:8, 2:8] = 7
    true[10:18, 10:18] = 3_000_000
    pred = np.zeros_like(true)
    pred[2:8, 2:9] = 90_000  # IoU 36/42
    pred[12:18, 10:18] = 5  # IoU 48/64
    iou, true_ids, pred_ids = iou_matrix(true, pred)
    assert true_ids.tolist() == [7, 3_000_000]
    assert pred_ids.tolist() == [5, 90_000]
    np.testing.assert_allclose(iou, [[0, 36 / 42], [48 / 64, 0]])
    assert match(true, pred, 0.8).tp == 1


def test_image_without_background_pixels() -> None:
    true = np.array([[1, 1, 2, 2]])
    pred = np.array([[9, 9, 9, 9]])
    iou, _, _ = iou_matrix(true, pred)
    np.testing.assert_allclose(iou, [[0.5], [0.5]])
    assert match(true, pred).tp == 1
    assert jaccard(true, pred) == 1.0


def test_empty_cases_are_defined() -> None:
    empty = np.zeros((4, 4), np.int32)
    cells = np.zeros((4, 4), np.int32)
    cells[1:3, 1:3] = 1
    both = score(empty, empty)
    assert (both.jaccard, both.precision, both.recall, both.f1, both.map_50_95) == (1, 1, 1, 1, 1)
    assert jaccard(empty, empty) == 1.0
    missed = match(cells, empty)
    assert (missed.precision, missed.recall, missed.f1, missed.fn) == (0.0, 0.0, 0.0, 1)
    spurious = score(empty, cells)
    assert (spurious.precision, spurious.recall, spurious.f1, spurious.map_50_95) == (0, 0, 0, 0)
    assert spurious.fp == 1


def test_identical_labels_score_perfectly_under_relabelling() -> None:
    rng = np.random.default_rng(1)
    true = ndi.label(ndi.gaussian_filter(rng.random((64, 64)), 2) > 0.52)[0]
    permuted = np.concatenate([[0], rng.permutation(np.arange(1, true.max() + 1)) * 11])[true]
    s = score(true, permuted)
    assert s.tp == true.max() > 3
    assert s.map_50_95 == 1.0 and s.jaccard == 1.0


@pytest.mark.parametrize(
    ("true", "pred", "fragment"),
    [
        (np.zeros((3, 3)), np.zeros((3, 3), int), "integer"),
        (np.zeros((3, 3), int), np.zeros((3, 4), int), "shape"),
        (np.zeros((2, 3, 3), int), np.zeros((2, 3, 3), int), "2-D"),
        (-np.ones((3, 3), int), np.zeros((3, 3), int), "negative"),
    ],
)
def test_bad_label_images_are_rejected(true: np.ndarray, pred: np.ndarray, fragment: str) -> None:
    with pytest.raises(LabelImageError, match=fragment):
        score(true, pred)


def test_bad_thresholds_are_rejected() -> None:
    with pytest.raises(ValueError, match="threshold"):
        match(TRUE, PRED, 0.0)
    with pytest.raises(ValueError, match="threshold"):
        average_precision(TRUE, PRED, [0.5, 1.5])


def test_score_set_pools_counts_not_ratios() -> None:
    empty = np.zeros_like(TRUE)
    pooled = score_set([TRUE, TRUE, empty], [PRED, TRUE, PRED])
    # image 1: tp 2 fp 1; image 2: tp 2; image 3: fp 3
    assert (pooled.tp, pooled.fp, pooled.fn) == (4, 4, 0)
    assert pooled.precision == pytest.approx(0.5)
    # Jaccard pooled: (7 + 8 + 0) / (8 + 8 + 7)
    assert pooled.jaccard == pytest.approx(15 / 23)
    with pytest.raises(ValueError, match="2 true label images but 1"):
        score_set([TRUE, TRUE], [PRED])


# --------------------------------------------------------------------------------------------
# Cross-check against Cellpose on real DSB2018 masks
# --------------------------------------------------------------------------------------------

SHARED_LABELS = Path("/work/shared/data/dsb2018_fluo/labels")


@pytest.fixture(scope="module")
def seed_label_images() -> list[np.ndarray]:
    """Real nucleus masks: the ones shipped with the synthetic generator, else the shared data."""
    try:
        from app.science.synthetic import load_seed_masks
    except ImportError:
        files = sorted(SHARED_LABELS.glob("*.tif"))[:8]
        if not files:
            pytest.skip("no real label images here (app.science.synthetic or /work/shared)")
        import tifffile

        return [tifffile.imread(f) for f in files]
    return load_seed_masks()


def _perturb(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible bad prediction: eroded, dilated, dropped, merged and spurious objects."""
    pred = np.zeros_like(labels)
    ids = np.arange(1, labels.max() + 1)
    action = rng.choice(["keep", "erode", "dilate", "drop", "shift"], size=ids.size, p=[0.35, 0.2, 0.2, 0.1, 0.15])
    for obj, what in zip(ids, action, strict=True):
        region = labels == obj
        if what == "erode":
            region = ndi.binary_erosion(region, iterations=int(rng.integers(1, 4)))
        elif what == "dilate":
            region = ndi.binary_dilation(region, iterations=int(rng.integers(1, 4))) & (pred == 0)
        elif what == "drop":
            continue
        elif what == "shift":
            region = np.roll(region, int(rng.integers(1, 5)), axis=int(rng.integers(0, 2)))
        pred[region] = obj
    # merge a few touching/close pairs: give object b the id of a
    for a, b in rng.choice(ids, size=(max(1, ids.size // 10), 2)):
        pred[pred == b] = a
    # a spurious blob
    pred[:6, :6] = labels.max() + 1
    return relabel_sequential(pred)[0]


def test_matches_cellpose_average_precision_on_real_masks(seed_label_images: list[np.ndarray]) -> None:
    cellpose_metrics = pytest.importorskip("cellpose.metrics")
    rng = np.random.default_rng(0)
    trues, preds = [], []
    for labels in seed_label_images[:8]:
        true = relabel_sequential(labels.astype(np.int32))[0]
        pred = _perturb(true, rng)
        trues.append(true)
        preds.append(pred)
        ap_cp, tp_cp, fp_cp, fn_cp = cellpose_metrics.average_precision(true, pred, IOU_THRESHOLDS)
        s = score(true, pred)
        np.testing.assert_allclose(s.ap, ap_cp, rtol=1e-6)
        np.testing.assert_allclose(average_precision(true, pred), ap_cp, rtol=1e-6)
        assert (s.tp, s.fp, s.fn) == (tp_cp[0], fp_cp[0], fn_cp[0])
        for k, t in enumerate(IOU_THRESHOLDS):
            m = match(true, pred, t)
            assert (m.tp, m.fp, m.fn) == (tp_cp[k], fp_cp[k], fn_cp[k])
        assert 0.2 < s.map_50_95 < 0.95  # the perturbation really is imperfect
    _, tp_all, fp_all, fn_all = cellpose_metrics.average_precision(trues, preds, IOU_THRESHOLDS)
    pooled = score_set(trues, preds)
    tp, fp, fn = tp_all.sum(0), fp_all.sum(0), fn_all.sum(0)
    np.testing.assert_allclose(pooled.ap, tp / (tp + fp + fn), rtol=1e-6)
