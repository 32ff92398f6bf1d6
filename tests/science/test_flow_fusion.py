"""Flow Fusion on ideal maps built from label images (no network needed)."""

from __future__ import annotations

import numpy as np
import pytest
from cellpose import dynamics

from app.science.flow_fusion import FUSED_FLOW_THRESHOLD, flow_fusion, fuse_maps
from app.science.metrics import match
from tests.science.test_backbone import disc_field


def ideal_maps(labels: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Maps a perfect model would predict: 5 x unit flows and a +-5 logit; cells not in ``keep`` absent."""
    if keep is not None:
        labels = np.where(np.isin(labels, keep), labels, 0)
    flows = dynamics.masks_to_flows(labels) if labels.any() else np.zeros((2, *labels.shape))
    return np.concatenate([5.0 * flows, np.where(labels > 0, 5.0, -5.0)[None]]).astype(np.float32)


def test_fuse_maps_is_a_weighted_mean():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 5, 6)).astype(np.float32)
    np.testing.assert_allclose(fuse_maps([a, b]), (a + b) / 2, rtol=1e-6)
    np.testing.assert_allclose(fuse_maps([a, b], weights=[3, 1]), 0.75 * a + 0.25 * b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fuse_maps([a, b], weights=[0, 2]), b)
    assert fuse_maps([a]).dtype == np.float32


@pytest.mark.parametrize(
    ("maps", "weights", "message"),
    [
        ([], None, "at least one channel"),
        ([np.zeros((3, 4, 4)), np.zeros((3, 4, 5))], None, "same size"),
        ([np.zeros((2, 4, 4))], None, r"\(3, Y, X\)"),
        ([np.zeros((3, 4, 4))] * 2, [1.0], "one weight per channel"),
        ([np.zeros((3, 4, 4))] * 2, [1.0, -1.0], ">= 0"),
        ([np.zeros((3, 4, 4))] * 2, [0.0, 0.0], "> 0"),
        ([np.zeros((3, 4, 4))] * 2, [np.nan, 1.0], "finite"),
    ],
)
def test_fuse_maps_rejects_bad_input_clearly(maps, weights, message):
    with pytest.raises(ValueError, match=message):
        fuse_maps(maps, weights)


def test_fusion_recovers_cells_each_channel_misses():
    _, labels = disc_field((128, 128), 12, seed=3)
    ids = np.arange(1, labels.max() + 1)
    # each cell is missing from at most one of three channels
    channels = [ideal_maps(labels, keep=ids[ids % 3 != k]) for k in range(3)]
    singles = [match(labels, flow_fusion([m], diameter=22.0, diam_mean=30.0).labels).recall for m in channels]
    assert max(singles) < 0.8
    result = flow_fusion(channels, diameter=22.0, diam_mean=30.0)
    assert match(labels, result.labels).f1 == 1.0
    assert result.labels.dtype == np.int32 and result.fused_maps.shape == (3, 128, 128)
    assert len(result.channel_maps) == 3


def test_shortened_flows_need_the_fused_threshold():
    _, labels = disc_field((128, 128), 10, seed=4)
    maps = ideal_maps(labels)
    maps[:2] *= 0.3  # channels that disagree in direction average to short vectors
    kept = flow_fusion([maps], diameter=22.0, diam_mean=30.0).labels
    strict = flow_fusion([maps], diameter=22.0, diam_mean=30.0, flow_threshold=0.4).labels
    assert match(labels, kept).f1 == 1.0
    assert match(labels, strict).tp < labels.max() // 2
    assert FUSED_FLOW_THRESHOLD != 0.4


def test_identical_channels_equal_the_single_channel():
    _, labels = disc_field((96, 96), 8, seed=5)
    maps = ideal_maps(labels)
    one = flow_fusion([maps], diameter=22.0, diam_mean=30.0).labels
    three = flow_fusion([maps, maps, maps], diameter=22.0, diam_mean=30.0, weights=[1, 2, 3]).labels
    np.testing.assert_array_equal(one, three)
