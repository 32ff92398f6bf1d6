"""Backbone inference: our forward loop reproduces Cellpose's ``eval`` and works for any CPnet width.

The helpers ``disc_field`` and ``disc_trained_net`` are shared with the other inference tests: a
full-width CPnet trained for 30 steps on three 64 x 64 disc images gives meaningful flows (every
disc of a new field found) in about 7 s, once per test session.
"""

from __future__ import annotations

import functools
import os
import tempfile

# Cellpose reads this when cellpose.models is first imported: never its download cache here.
os.environ.setdefault("CELLPOSE_LOCAL_MODELS_PATH", tempfile.mkdtemp(prefix="cellpose-models-"))

import numpy as np
import pytest
import torch
from skimage.draw import disk

from app.science import backbone as bb
from app.science.training import segmentation_loss


def disc_field(shape: tuple[int, int], n: int, seed: int, radius: tuple[float, float] = (9.0, 13.0)):
    """A noisy image of ``n`` non-overlapping bright discs and its label image."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    count = 0
    for _ in range(n * 50):
        r = rng.uniform(*radius)
        rr, cc = disk((rng.uniform(0, shape[0]), rng.uniform(0, shape[1])), r, shape=shape)
        if (labels[rr, cc] > 0).any():
            continue
        count += 1
        labels[rr, cc] = count
        if count == n:
            break
    image = (labels > 0) * rng.uniform(0.6, 1.0) + 0.1 * rng.standard_normal(shape)
    return image.astype(np.float32), labels


@functools.lru_cache(maxsize=None)
def disc_trained_net(widths: tuple[int, ...] = bb.FULL_WIDTHS) -> torch.nn.Module:
    """A CPnet trained briefly with Cellpose's loss on disc images (cached for the session)."""
    from cellpose import dynamics
    from cellpose.transforms import normalize99

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = bb.build_network(widths)
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 0.3  # running stats must settle within a few dozen steps
        pairs = [disc_field((64, 64), 5, seed) for seed in range(3)]
        x = torch.from_numpy(np.stack([np.stack([normalize99(i), np.zeros_like(i)]) for i, _ in pairs]))
        targets = torch.from_numpy(
            np.stack([np.concatenate([(lab > 0)[None], dynamics.masks_to_flows(lab)]) for _, lab in pairs]).astype(
                np.float32
            )
        )
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.005, weight_decay=1e-5)
        net.train()
        for _ in range(30):
            loss = segmentation_loss(net(x)[0], targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 0.05
        net.eval()
        return net
    finally:
        torch.set_num_threads(threads)


def _cellpose_model_with(net: torch.nn.Module, tmp_path):
    from cellpose import models

    path = tmp_path / "weights.pth"
    torch.save(net.state_dict(), path)
    return models.CellposeModel(pretrained_model=str(path), mkldnn=False)


# ---------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------


def test_normalization_dict_is_complete_and_fresh():
    first = bb.Normalization().cellpose_params()
    second = bb.Normalization().cellpose_params()
    assert first == second and first is not second
    assert first["lowhigh"] is None and first["percentile"] == [1.0, 99.0]
    assert {"normalize", "norm3D", "invert", "sharpen_radius", "smooth_radius", "tile_norm_blocksize"} <= set(first)
    first["percentile"][0] = 50.0  # a caller's mutation must not leak into the next call
    assert bb.Normalization().cellpose_params()["percentile"] == [1.0, 99.0]
    assert bb.Normalization(low=10, high=20).cellpose_params()["lowhigh"] == [10.0, 20.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lower_percentile": 99.0, "upper_percentile": 1.0},
        {"upper_percentile": 101.0},
        {"low": 1.0},
        {"low": 5.0, "high": 5.0},
    ],
)
def test_normalization_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        bb.Normalization(**kwargs)


def test_fixed_normalization_is_a_linear_map():
    torch.manual_seed(0)
    net = bb.build_network(bb.HALF_WIDTHS)
    image, _ = disc_field((64, 64), 4, seed=1)
    image = 1000.0 + 500.0 * image
    a = bb.predict_maps(net, image, diameter=30.0, normalization=bb.Normalization(low=1000.0, high=1500.0))
    b = bb.predict_maps(net, (image - 1000.0) / 500.0, diameter=30.0, normalization=bb.Normalization(low=0.0, high=1.0))
    np.testing.assert_allclose(a.maps, b.maps, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Reproducing Cellpose's eval
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("diameter", [30.0, 20.0])
def test_tiled_prediction_and_masks_equal_cellpose_eval(diameter, tmp_path):
    net = disc_trained_net()
    image, labels = disc_field((224, 224), 30, seed=11)
    model = _cellpose_model_with(net, tmp_path)
    masks_ref, flows_ref, style_ref = model.eval(image, channels=[0, 0], diameter=diameter)

    maps = bb.predict_maps(net, image, diameter=diameter, tile=True)
    masks = bb.masks_from_maps(
        maps, diameter=diameter, diam_mean=bb.diam_mean_of(net), min_size_at_training_scale=False
    )

    assert masks_ref.max() >= 25, "the trained net must give non-trivial masks for this check to mean anything"
    np.testing.assert_array_equal(masks, masks_ref)
    np.testing.assert_allclose(maps.flows, flows_ref[1], atol=1e-5)
    np.testing.assert_allclose(maps.cellprob, flows_ref[2], atol=1e-5)
    np.testing.assert_allclose(maps.style, style_ref, atol=1e-6)
    assert maps.maps.dtype == np.float32 and masks.dtype == np.int32


@pytest.mark.slow
def test_untiled_and_multi_channel_paths_agree_with_tiled(tmp_path):
    net = disc_trained_net()
    first, labels = disc_field((160, 160), 14, seed=21)
    second, _ = disc_field((160, 160), 14, seed=22)
    tiled = [bb.predict_maps(net, img, diameter=24.0, tile=True) for img in (first, second)]
    untiled = bb.predict_maps(net, first, diameter=24.0, tile=False)
    # tiles taper at their borders; away from the seams the maps agree and so do the masks
    masks_tiled = bb.masks_from_maps(tiled[0], diameter=24.0, diam_mean=30.0)
    masks_untiled = bb.masks_from_maps(untiled, diameter=24.0, diam_mean=30.0)
    assert masks_tiled.max() == masks_untiled.max() == labels.max()

    multi = bb.predict_maps_multi([net, net], np.stack([first, second]), diameter=24.0, tile=True, channels_last=False)
    for got, want in zip(multi, tiled):
        np.testing.assert_allclose(got.maps, want.maps, atol=1e-4)
        np.testing.assert_allclose(got.style, want.style, atol=1e-5)
    fast = bb.predict_maps_multi([net, net], np.stack([first, second]), diameter=[24.0, 24.0])
    np.testing.assert_allclose(fast[0].maps, untiled.maps, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Any width, shapes, errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tile", [True, False])
def test_half_width_network_gives_full_resolution_maps(tile):
    torch.manual_seed(0)
    net = bb.build_network(bb.HALF_WIDTHS)
    image, _ = disc_field((70, 90), 4, seed=2)
    out = bb.predict_maps(net, image, diameter=20.0, tile=tile, bsize=64)
    assert out.maps.shape == (3, 70, 90) and out.maps.dtype == np.float32
    assert out.style.shape == (128,)
    assert abs(float(np.linalg.norm(out.style)) - 1.0) < 1e-4
    assert np.isfinite(out.maps).all()


def test_multi_channel_per_channel_settings_match_single_channel_calls():
    torch.manual_seed(0)
    net_a = bb.build_network(bb.HALF_WIDTHS)
    net_b = bb.build_network(bb.HALF_WIDTHS, diam_mean=17.0)
    field = np.stack([disc_field((48, 56), 3, seed=s)[0] for s in (3, 4, 5)])
    nets = [net_a, net_b, net_a]
    diameters = [20.0, 25.0, 30.0]
    norms = [bb.Normalization(), bb.Normalization(2.0, 98.0), bb.Normalization()]
    multi = bb.predict_maps_multi(nets, field, diameter=diameters, normalizations=norms, channels_last=False)
    for k in range(3):
        single = bb.predict_maps(nets[k], field[k], diameter=diameters[k], normalization=norms[k], tile=False)
        np.testing.assert_allclose(multi[k].maps, single.maps, atol=1e-4)


def test_diameter_none_uses_diam_labels():
    torch.manual_seed(0)
    net = bb.build_network(bb.HALF_WIDTHS)
    net.diam_labels.data[:] = 15.0
    image, _ = disc_field((48, 48), 3, seed=6)
    a = bb.predict_maps(net, image, diameter=None, tile=False)
    b = bb.predict_maps(net, image, diameter=15.0, tile=False)
    np.testing.assert_array_equal(a.maps, b.maps)


def test_bad_inputs_raise_clear_value_errors():
    net = bb.build_network(bb.HALF_WIDTHS)
    with pytest.raises(ValueError, match="dimensions"):
        bb.predict_maps(net, np.zeros((2, 8, 8)), diameter=30.0)
    with pytest.raises(ValueError, match="diameter"):
        bb.predict_maps(net, np.zeros((8, 8)), diameter=-3.0)
    with pytest.raises(ValueError, match="one per channel"):
        bb.predict_maps_multi([net], np.zeros((2, 8, 8)), diameter=30.0)
    with pytest.raises(ValueError, match="3 diameters"):
        bb.predict_maps_multi([net, net], np.zeros((2, 8, 8)), diameter=[30.0, 30.0, 30.0])
    with pytest.raises(ValueError, match=r"\(3, Y, X\)"):
        bb.masks_from_maps(np.zeros((2, 8, 8)), diameter=30.0, diam_mean=30.0)


def test_masks_from_ideal_maps_recover_the_labels():
    from cellpose import dynamics

    _, labels = disc_field((96, 96), 8, seed=7)
    flows = dynamics.masks_to_flows(labels)
    maps = np.concatenate([5.0 * flows, np.where(labels > 0, 5.0, -5.0)[None]]).astype(np.float32)
    masks = bb.masks_from_maps(maps, diameter=22.0, diam_mean=30.0)
    assert masks.max() == labels.max()
    from app.science.metrics import match

    assert match(labels, masks).f1 == 1.0
    assert bb.default_niter(20.0, 30.0) == pytest.approx(133.333, abs=1e-3)


def test_min_size_is_read_at_the_training_scale():
    # 4-px objects (13 px of area): Cellpose's literal 15-px cut-off removes every one of them,
    # the cut-off read at the training scale (15 x (4 / 30)^2 -> 1 px) keeps them.
    assert bb.min_size_for(15, 30.0, 30.0) == 15
    assert bb.min_size_for(15, 90.0, 30.0) == 15
    assert bb.min_size_for(15, 15.0, 30.0) == 4
    assert bb.min_size_for(0, 5.0, 30.0) == 0
    labels = np.zeros((48, 48), np.int32)
    yy, xx = np.mgrid[:48, :48]
    for i, (cy, cx) in enumerate([(10, 10), (10, 30), (30, 10), (30, 30)], start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 4] = i  # 13-pixel objects
    from cellpose import dynamics

    flows = dynamics.masks_to_flows(labels)
    maps = np.concatenate([5.0 * flows, np.where(labels > 0, 5.0, -5.0)[None]]).astype(np.float32)
    scaled = bb.masks_from_maps(maps, diameter=4.0, diam_mean=30.0)
    literal = bb.masks_from_maps(maps, diameter=4.0, diam_mean=30.0, min_size_at_training_scale=False)
    assert scaled.max() == 4
    assert literal.max() == 0
    many = bb.masks_for_flow_thresholds(maps, diameter=4.0, diam_mean=30.0, flow_thresholds=[0.4])
    np.testing.assert_array_equal(many[0], scaled)
