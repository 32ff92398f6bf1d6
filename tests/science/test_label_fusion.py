"""Label-fusion baselines on hand-made and synthetic label images."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from app.science.label_fusion import (
    FUSION_METHODS,
    LABEL_FUSION_METHODS,
    fuse_labels,
    instance_cores,
    simple_foreground,
)
from app.science.metrics import match
from tests.science.test_backbone import disc_field


def touching_pair(shift: int = 0) -> np.ndarray:
    """Two 14 x 14 squares sharing an edge, optionally shifted right by ``shift`` pixels."""
    labels = np.zeros((40, 48), np.int32)
    labels[12:26, 8 + shift : 22 + shift] = 1
    labels[12:26, 22 + shift : 36 + shift] = 2
    return labels


def bad_rater(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A channel that segments nonsense: blobs where the cells are not."""
    _, labels = disc_field(shape, 10, seed=seed, radius=(5.0, 8.0))
    return labels


@pytest.mark.parametrize("method", LABEL_FUSION_METHODS)
def test_identical_raters_give_the_same_instances_back(method):
    _, labels = disc_field((128, 128), 14, seed=1)
    fused = fuse_labels([labels] * 4, method)
    m = match(labels, fused)
    assert m.f1 == 1.0 and m.mean_matched_iou == 1.0
    assert fused.dtype == np.int32 and fused.shape == labels.shape


@pytest.mark.parametrize("method", LABEL_FUSION_METHODS)
def test_one_bad_rater_of_four_is_outvoted(method):
    _, labels = disc_field((128, 128), 14, seed=2)
    noisy = [np.where(ndi.binary_erosion(labels > 0), labels, 0), labels, ndi.grey_dilation(labels, size=3)]
    fused = fuse_labels([*noisy, bad_rater(labels.shape, seed=99)], method)
    m = match(labels, fused)
    assert m.f1 == 1.0, m


def test_simple_drops_the_bad_rater():
    _, labels = disc_field((128, 128), 14, seed=3)
    raters = [labels > 0, ndi.binary_erosion(labels > 0), labels > 0, bad_rater(labels.shape, seed=7) > 0]
    result = simple_foreground(raters)
    assert result.kept == (0, 1, 2)
    assert min(result.weights) > 0.9
    # a fixed Dice floor works too
    assert simple_foreground(raters, min_dice=0.5).kept == (0, 1, 2)


@pytest.mark.parametrize("method", LABEL_FUSION_METHODS)
def test_touching_objects_stay_separate(method):
    raters = [touching_pair(0), touching_pair(1), touching_pair(0)]
    fused = fuse_labels(raters, method)
    assert fused.max() == 2
    m = match(touching_pair(0), fused)
    assert m.tp == 2 and m.mean_matched_iou > 0.85


def test_object_seen_by_one_rater_of_three_is_outvoted():
    base = touching_pair(0)
    extra = base.copy()
    extra[30:38, 2:10] = 3  # only one rater of three sees this small object
    voted = fuse_labels([base, base, extra], "voting", min_size=1)
    assert voted.max() == 2


def test_instance_cores_of_touching_objects_do_not_touch():
    cores = instance_cores(touching_pair(0))
    assert ndi.label(cores)[1] == 2


def test_empty_raters_fuse_to_empty():
    empty = np.zeros((20, 20), np.int32)
    for method in LABEL_FUSION_METHODS:
        assert not fuse_labels([empty, empty, empty], method).any()


def test_bad_method_and_parameters_raise_value_errors_listing_the_valid_ones():
    labels = touching_pair()
    with pytest.raises(ValueError, match="staple, simple, voting, majority_voting"):
        fuse_labels([labels], "median")
    with pytest.raises(ValueError, match="fuses network maps"):
        fuse_labels([labels], "flow_fusion")
    with pytest.raises(ValueError, match="patch_size"):
        fuse_labels([labels], "majority_voting", alpha=2.0)
    with pytest.raises(ValueError, match="same size"):
        fuse_labels([labels, labels[:10]], "voting")
    with pytest.raises(ValueError, match="integer labels"):
        fuse_labels([labels.astype(float)], "voting")
    with pytest.raises(ValueError, match="at least one"):
        fuse_labels([], "voting")
    assert set(LABEL_FUSION_METHODS) < set(FUSION_METHODS)


def test_label_fusion_on_a_synthetic_field_scores_close_to_the_truth():
    from app.science.synthetic import make_plate

    field = make_plate(1, size=256, seed=5)[0]
    truth = field.nuclei
    assert truth.max() >= 10
    rng = np.random.default_rng(0)
    raters = []
    for _ in range(3):  # each channel misses a different ~15 % of the nuclei
        ids = np.unique(truth)[1:]
        missing = rng.choice(ids, size=max(1, len(ids) // 7), replace=False)
        raters.append(np.where(np.isin(truth, missing), 0, truth))
    for method in LABEL_FUSION_METHODS:
        fused = fuse_labels(raters, method, min_size=1)
        assert match(truth, fused).f1 > 0.9, method
