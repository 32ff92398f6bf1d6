"""Augmentations: each one acts when forced, geometry keeps image and flow targets in register,
the microscopy ablation switch drops the photometric ones, and a seed fixes everything."""

from __future__ import annotations

import math

import numpy as np
import pytest
from cellpose.dynamics import masks_to_flows
from scipy.ndimage import binary_erosion

from app.science.augmentations import (
    AUGMENTATIONS,
    GEOMETRIC,
    PHOTOMETRIC,
    AugmentationConfig,
    AugmentationError,
    augment,
    sample_geometry,
    warp_flows,
    warp_labels,
)

BSIZE = 96


def _discs() -> np.ndarray:
    """Five discs of different sizes on a 120 x 140 field (one partly cut by the border)."""
    yy, xx = np.mgrid[:120, :140]
    labels = np.zeros((120, 140), np.int32)
    for index, (cy, cx, r) in enumerate([(30, 35, 12), (80, 40, 16), (60, 95, 20), (100, 115, 9), (5, 120, 10)]):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = index + 1
    return labels


@pytest.fixture(scope="module")
def sample() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = _discs()
    flows = np.concatenate([(labels > 0)[None].astype(np.float32), masks_to_flows(labels).astype(np.float32)])
    # A textured, asymmetric image so that every flip or rotation changes it.
    rng = np.random.default_rng(5)
    image = (0.2 + 0.6 * (labels > 0) + 0.1 * rng.random(labels.shape)).astype(np.float32)[None]
    image[0, :, :10] += 0.3
    return image, flows, labels


def forced(name: str, **kwargs) -> AugmentationConfig:
    return AugmentationConfig(bsize=BSIZE, probability=1.0, include=frozenset({name}), **kwargs)


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_each_augmentation_changes_the_image_when_forced(sample, name):
    image, flows, _ = sample
    baseline, _ = augment(image, flows, np.random.default_rng(3), forced(name, enabled=False))
    changed, _ = augment(image, flows, np.random.default_rng(3), forced(name))
    assert changed.shape == baseline.shape == (1, BSIZE, BSIZE)
    assert np.abs(changed - baseline).mean() > 1e-3, f"{name} did nothing when forced"


@pytest.mark.parametrize("name", GEOMETRIC)
def test_geometry_keeps_flows_pointing_at_the_transformed_objects(sample, name):
    """Flow vectors transformed with the image agree with flows recomputed from transformed labels."""
    image, flows, labels = sample
    for seed in range(3):
        geometry = sample_geometry(labels.shape, np.random.default_rng(seed), forced(name), zoom=0.9)
        moved_flows = warp_flows(flows, geometry)
        moved_labels = warp_labels(labels, geometry)
        recomputed = masks_to_flows(moved_labels.astype(np.int64))
        # Objects cut by the crop get new centres when recomputed, so compare whole objects only.
        border = np.unique(np.concatenate([moved_labels[0], moved_labels[-1], moved_labels[:, 0], moved_labels[:, -1]]))
        inside = binary_erosion(moved_labels > 0, iterations=2) & ~np.isin(moved_labels, border)
        assert inside.sum() > 200
        dot = moved_flows[1] * recomputed[0] + moved_flows[2] * recomputed[1]
        norms = np.hypot(moved_flows[1], moved_flows[2]) * np.hypot(recomputed[0], recomputed[1]) + 1e-9
        cosine = (dot / norms)[inside]
        assert cosine.mean() > 0.95, (name, seed, cosine.mean())
        # The cell-probability target and the image's bright objects still coincide.
        moved_image = augment(image, flows, np.random.default_rng(seed), forced(name), zoom=0.9)[0][0]
        assert np.array_equal(moved_flows[0] > 0.5, moved_labels > 0)
        assert moved_image[inside].mean() > moved_image[moved_labels == 0].mean() + 0.3


def test_a_wrong_vector_rotation_would_be_caught(sample):
    """Guard for the test above: flows rotated the wrong way disagree with recomputed ones."""
    _, flows, labels = sample
    geometry = sample_geometry(labels.shape, np.random.default_rng(0), forced("rotate"))
    assert abs(geometry.rotation) > 0.3
    moved = warp_flows(flows, geometry)
    recomputed = masks_to_flows(warp_labels(labels, geometry).astype(np.int64))
    inside = binary_erosion(warp_labels(labels, geometry) > 0, iterations=2)
    right = (moved[1] * recomputed[0] + moved[2] * recomputed[1])[inside].mean()
    turn = geometry.vector_matrix
    # Undo the vector rotation: positions moved, vectors did not.
    unturned_x = turn[0, 0] * moved[2] + turn[1, 0] * moved[1]
    unturned_y = turn[0, 1] * moved[2] + turn[1, 1] * moved[1]
    wrong = (unturned_y * recomputed[0] + unturned_x * recomputed[1])[inside].mean()
    assert right > wrong + 0.1


def test_flips_and_rotation_move_image_and_targets_together(sample):
    image, flows, _ = sample
    config = AugmentationConfig(bsize=BSIZE, probability=1.0, include=frozenset(GEOMETRIC))
    for seed in range(5):
        out_image, out_flows = augment(image, flows, np.random.default_rng(seed), config)
        foreground = out_flows[0] > 0.5
        # Every target foreground pixel is bright in the image (objects are 0.8+, background < 0.6).
        assert out_image[0][binary_erosion(foreground, iterations=1)].min() > 0.6
        assert np.all(np.hypot(out_flows[1], out_flows[2])[~foreground] < 1.0 + 1e-5)


def test_microscopy_switch_turns_off_photometric_but_keeps_geometry(sample):
    image, flows, _ = sample
    for name in PHOTOMETRIC:
        on, _ = augment(image, flows, np.random.default_rng(1), forced(name))
        off, _ = augment(image, flows, np.random.default_rng(1), forced(name, microscopy=False))
        plain, _ = augment(image, flows, np.random.default_rng(1), forced(name, enabled=False))
        assert not np.allclose(on, plain)
        assert np.array_equal(off, plain), f"{name} ran with microscopy=False"
    geometric = AugmentationConfig(bsize=BSIZE, probability=1.0, microscopy=False)
    rotated, _ = augment(image, flows, np.random.default_rng(1), geometric)
    plain, _ = augment(image, flows, np.random.default_rng(1), AugmentationConfig(bsize=BSIZE, enabled=False))
    assert not np.allclose(rotated, plain)
    # Geometry alone only interpolates: no value leaves the input's range.
    assert rotated.min() >= 0.0 and rotated.max() <= image.max() + 1e-5


def test_group_switch_turns_everything_off(sample):
    image, flows, _ = sample
    config = AugmentationConfig(bsize=BSIZE, probability=1.0, enabled=False)
    for seed in range(3):
        out, out_flows = augment(image, flows, np.random.default_rng(seed), config)
        geometry = sample_geometry(image.shape[1:], np.random.default_rng(seed), config)
        assert geometry.scale == 1.0 and geometry.rotation == 0.0 and not (geometry.flip_x or geometry.flip_y)
        # A pure crop: the output is a window of the input.
        oy = int(round(-geometry.matrix[1, 2]))
        ox = int(round(-geometry.matrix[0, 2]))
        np.testing.assert_allclose(out[0], image[0, oy : oy + BSIZE, ox : ox + BSIZE], atol=1e-5)


def test_probability_is_about_one_half():
    config = AugmentationConfig(bsize=32, include=frozenset({"flip_x"}))
    rng = np.random.default_rng(0)
    flips = [sample_geometry((64, 64), rng, config).flip_x for _ in range(2000)]
    assert 0.45 < np.mean(flips) < 0.55


def test_ranges_of_scale_and_rotation():
    rng = np.random.default_rng(0)
    scale_config = forced("scale")
    rotate_config = forced("rotate")
    scales = [sample_geometry((64, 64), rng, scale_config, zoom=2.0).scale for _ in range(500)]
    angles = [sample_geometry((64, 64), rng, rotate_config).rotation for _ in range(500)]
    assert 1.0 <= min(scales) and max(scales) <= 2.0 and max(scales) - min(scales) > 0.9
    assert -math.pi / 2 <= min(angles) < -1.4 and 1.4 < max(angles) <= math.pi / 2


def test_brightness_shift_is_bounded_and_clipped(sample):
    image, flows, _ = sample
    plain, _ = augment(image, flows, np.random.default_rng(2), forced("brightness", enabled=False))
    shifted, _ = augment(image, flows, np.random.default_rng(2), forced("brightness"))
    difference = shifted - plain
    assert 0 < np.abs(difference).max() <= 0.1 + 1e-6
    assert shifted.min() >= min(0.0, plain.min()) - 1e-6 and shifted.max() <= max(1.0, plain.max()) + 1e-6


def test_deterministic_for_a_seed(sample):
    image, flows, _ = sample
    config = AugmentationConfig(bsize=BSIZE)
    first = augment(image, flows, np.random.default_rng(42), config)
    second = augment(image, flows, np.random.default_rng(42), config)
    other = augment(image, flows, np.random.default_rng(43), config)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_small_images_are_padded_to_the_crop_size():
    image = np.ones((2, 40, 50), np.float32)
    flows = np.zeros((3, 40, 50), np.float32)
    out, out_flows = augment(image, flows, np.random.default_rng(0), AugmentationConfig(bsize=64, enabled=False))
    assert out.shape == (2, 64, 64) and out_flows.shape == (3, 64, 64)
    assert out.sum() == pytest.approx(2 * 40 * 50, rel=1e-4)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(AugmentationError, match="unknown augmentation"):
        AugmentationConfig(include=frozenset({"elastic"}))
    with pytest.raises(AugmentationError, match="flows must be"):
        augment(np.zeros((1, 32, 32)), np.zeros((2, 32, 32)), np.random.default_rng(0))
    with pytest.raises(AugmentationError, match="channels, Y, X"):
        augment(np.zeros((32, 32)), np.zeros((3, 32, 32)), np.random.default_rng(0))
    with pytest.raises(AugmentationError, match="probability"):
        AugmentationConfig(probability=1.5)
