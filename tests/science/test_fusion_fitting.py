"""Learned Flow Fusion on ideal maps built from label images (no network needed)."""

from __future__ import annotations

import numpy as np
import pytest

from app.science.backbone import masks_for_flow_thresholds, masks_from_maps
from app.science.flow_fusion import (
    FusionInputError,
    FusionParameters,
    flow_fusion,
    fuse_maps,
)
from app.science.fusion_fitting import (
    FusionFittingError,
    bootstrap_f1,
    fit_fusion_parameters,
    fit_thresholds,
    simplex_weights,
    weight_grid,
)
from tests.science.test_backbone import disc_field
from tests.science.test_flow_fusion import ideal_maps


def _fields(n: int, size: int = 96, cells: int = 7):
    return [disc_field((size, size), cells, seed=100 + i)[1] for i in range(n)]


def test_masks_for_several_flow_thresholds_equal_one_reconstruction_each():
    labels = _fields(1)[0]
    rng = np.random.default_rng(0)
    maps = ideal_maps(labels) + rng.normal(0, 1.5, (3, *labels.shape)).astype(np.float32)
    thresholds = [0.0, 0.4, 0.8]
    many = masks_for_flow_thresholds(maps, diameter=22.0, diam_mean=30.0, flow_thresholds=thresholds)
    for t, masks in zip(thresholds, many):
        np.testing.assert_array_equal(masks, masks_from_maps(maps, diameter=22.0, diam_mean=30.0, flow_threshold=t))


def test_weight_grid_holds_equal_weights_first_and_every_channel_alone():
    for k in (2, 3, 4):
        grid = weight_grid(k)
        assert np.allclose(grid[0], 1.0 / k)
        assert all(tuple(row) in grid for row in np.eye(k))
        assert all(abs(sum(w) - 1.0) < 1e-9 for w in grid)
    assert len(simplex_weights(4, 4)) == 35
    assert len(weight_grid(8)) <= 8 + 28 + 8 + 1


def test_a_planted_best_channel_gets_one_hot_weights():
    truths = _fields(6)
    per_field = []
    for i, labels in enumerate(truths):
        decoy = disc_field(labels.shape, 7, seed=500 + i)[1]  # confident cells that are not there
        ids = np.arange(1, labels.max() + 1)
        per_field.append([ideal_maps(labels), ideal_maps(decoy), ideal_maps(labels, keep=ids[ids % 2 == 0])])
    params = fit_fusion_parameters(
        per_field,
        truths,
        ["good", "decoy", "half"],
        diameter=22.0,
        diam_mean=30.0,
        methods=("equal", "weights"),
        n_boot=300,
    )
    assert params.method == "weights"
    assert params.weights_for(["good", "decoy", "half"])[0] >= 2 / 3
    assert params.weights[1] == 0.0
    assert params.cv_f1 == pytest.approx(1.0)
    lo, hi = params.cv_interval
    assert lo <= params.cv_f1 <= hi
    assert params.details["methods"]["equal"]["cv_f1"] < 0.9
    # what fitting promised is what applying the record gives
    fused = flow_fusion(
        per_field[0],
        diameter=22.0,
        diam_mean=30.0,
        weights=params.weights,
        flow_threshold=params.flow_threshold,
        cellprob_threshold=params.cellprob_threshold,
    )
    from app.science.metrics import match

    assert match(truths[0], fused.labels).f1 == 1.0


def test_channels_that_complement_each_other_keep_equal_weights():
    truths = _fields(5)
    per_field = []
    for labels in truths:
        ids = np.arange(1, labels.max() + 1)
        per_field.append([ideal_maps(labels, keep=ids[ids % 3 != k]) for k in range(3)])
    params = fit_fusion_parameters(per_field, truths, ["a", "b", "c"], diameter=22.0, diam_mean=30.0, n_boot=300)
    assert params.method == "equal"
    np.testing.assert_allclose(params.weights, [1 / 3] * 3)
    assert params.cv_f1 > 0.95
    assert max(params.details["single_channel_best_f1"].values()) < 0.85


def test_probability_confidence_ignores_a_channel_that_sees_nothing_there():
    labels = _fields(1)[0]
    good = ideal_maps(labels)
    blind = np.zeros_like(good)
    blind[2] = -5.0  # certain there is no cell anywhere
    plain = fuse_maps([good, blind])
    weighted = fuse_maps([good, blind], confidence="probability")
    inside = labels > 0
    assert np.abs(weighted[:2][:, inside] - good[:2][:, inside]).mean() < 0.1 * np.abs(good[:2][:, inside]).mean()
    assert np.abs(plain[:2][:, inside] - good[:2][:, inside]).mean() > 0.4 * np.abs(good[:2][:, inside]).mean()
    agreement = fuse_maps([good, good], confidence="agreement")
    np.testing.assert_allclose(agreement, good, atol=1e-4)


def test_fusion_parameters_round_trip_and_reject_nonsense():
    params = FusionParameters(
        "per_pixel",
        ("x", "y"),
        (0.5, 0.5),
        0.8,
        -1.0,
        confidence="probability",
        cv_f1=0.9,
        cv_interval=(0.85, 0.95),
        n_fields=6,
        details={"a": 1},
    )
    back = FusionParameters.from_dict(params.to_dict())
    assert back == params and back.details == {"a": 1}
    np.testing.assert_allclose(params.weights_for(["y", "x"]), [0.5, 0.5])
    with pytest.raises(FusionInputError, match="channels"):
        params.weights_for(["x", "z"])
    with pytest.raises(FusionInputError, match="confidence"):
        FusionParameters("equal", ("x",), (1.0,), 0.4, 0.0, confidence="vibes")
    with pytest.raises(FusionInputError, match="record"):
        FusionParameters.from_dict({"method": "equal"})


def test_fitting_rejects_mismatched_inputs():
    truths = _fields(2)
    maps = [[ideal_maps(t)] for t in truths]
    with pytest.raises(FusionFittingError, match="fields"):
        fit_fusion_parameters(maps, truths[:1], ["a"], diameter=22.0, diam_mean=30.0)
    with pytest.raises(FusionFittingError, match="expected 2"):
        fit_fusion_parameters(maps, truths, ["a", "b"], diameter=22.0, diam_mean=30.0)


def test_threshold_fit_and_bootstrap_are_consistent():
    truths = _fields(3)
    fit = fit_thresholds([ideal_maps(t) for t in truths], truths, diameter=22.0, diam_mean=30.0)
    assert fit.f1 == 1.0
    counts = np.array([[5, 0, 0], [3, 1, 1], [0, 2, 2]])
    samples = bootstrap_f1(counts, n_boot=500)
    assert samples.min() >= 0.0 and samples.max() <= 1.0
    assert samples.min() < 2 * 8 / (2 * 8 + 6) < samples.max()
