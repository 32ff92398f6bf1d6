"""Channel-wise fine-tuning: splits, diameters, flow targets, Cellpose's loss and schedule, and tiny
real trainings (loss goes down, early stopping restores the best checkpoint, cancellation)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from app.science import training
from app.science.backbone import build_network
from app.science.training import (
    TrainingCancelled,
    TrainingConfig,
    TrainingDataError,
    finetune,
    flow_targets,
    learning_rate_schedule,
    segmentation_loss,
    split_dataset,
    training_diameters,
)

TINY = (8, 16, 32, 64)


def disc_field(seed: int, size: int = 96, radius: tuple[int, int] = (6, 10), n: int = 8, contrast: float = 1.0):
    """A noisy fluorescence-like image of non-touching discs and its labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    placed = 0
    for _ in range(200):
        r = int(rng.integers(radius[0], radius[1] + 1))
        cy, cx = rng.integers(r + 1, size - r - 1, size=2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        grown = (yy - cy) ** 2 + (xx - cx) ** 2 <= (r + 2) ** 2
        if labels[grown].any():
            continue
        placed += 1
        labels[disc] = placed
        if placed == n:
            break
    image = (
        0.1
        + contrast * (labels > 0) * rng.uniform(0.5, 1.0, size=placed + 1)[labels]
        + rng.normal(0, 0.05, labels.shape)
    )
    return image.astype(np.float32), labels


def disc_set(seeds, **kwargs):
    pairs = [disc_field(s, **kwargs) for s in seeds]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def tiny_config(**overrides) -> TrainingConfig:
    fields = dict(
        bsize=64,
        batch_size=4,
        max_epochs=6,
        min_epochs=0,
        patience=50,
        warmup_epochs=1,
        learning_rate=0.01,
        min_train_masks=1,
        val_crops_per_image=1,
        seed=0,
    )
    fields.update(overrides)
    return TrainingConfig(**fields)


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------


def test_split_is_40_5_5_disjoint_and_seeded():
    split = split_dataset(50)
    assert (len(split.train), len(split.val), len(split.test)) == (40, 5, 5)
    assert sorted(split.train + split.val + split.test) == list(range(50))
    assert split_dataset(50, seed=0) == split
    assert split_dataset(50, seed=1) != split


def test_split_is_proportional_for_other_sizes():
    for n, expected in [(20, (16, 2, 2)), (100, (80, 10, 10)), (7, (5, 1, 1))]:
        split = split_dataset(n)
        assert (len(split.train), len(split.val), len(split.test)) == expected
        assert len(set(split.train) | set(split.val) | set(split.test)) == n
    with pytest.raises(TrainingDataError, match="at least 3"):
        split_dataset(2)


def test_training_diameters_mean_and_mean_plus_sd():
    yy, xx = np.mgrid[:100, :100]
    small = ((yy - 50) ** 2 + (xx - 50) ** 2 < 10**2).astype(np.int32)
    large = ((yy - 50) ** 2 + (xx - 50) ** 2 < 20**2).astype(np.int32)
    mean, plus_sd = training_diameters([small, large])
    # Equivalent-circle diameters of discs of radius 10 and 20.
    assert mean == pytest.approx(30.0, abs=0.5)
    assert plus_sd - mean == pytest.approx(10.0, abs=0.5)
    with pytest.raises(TrainingDataError):
        training_diameters([])


def test_flow_targets_match_cellpose_and_are_cached(tmp_path, monkeypatch):
    from cellpose.dynamics import labels_to_flows

    _, labels = disc_field(3)
    labels[labels == 2] = 77  # non-consecutive ids are fine
    targets = flow_targets(labels, cache_dir=tmp_path)
    reference = labels_to_flows([labels.copy()], device=torch.device("cpu"))[0]  # [labels, cellprob, flow Y, flow X]
    np.testing.assert_allclose(targets, reference[1:], atol=1e-6)
    assert len(list(tmp_path.glob("*.npy"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("flows recomputed despite the cache")

    monkeypatch.setattr(training.dynamics, "masks_to_flows", fail)
    np.testing.assert_array_equal(flow_targets(labels, cache_dir=tmp_path), targets)


def test_loss_equals_cellpose_loss():
    from cellpose.train import _loss_fn_seg

    rng = np.random.default_rng(0)
    targets = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    targets[:, 0] = targets[:, 0] > 0
    output = torch.from_numpy(rng.normal(size=(2, 3, 16, 16)).astype(np.float32))
    ours = segmentation_loss(output, torch.from_numpy(targets)).item()
    theirs = _loss_fn_seg(targets, output, torch.device("cpu")).item()
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_learning_rate_schedule_is_cellposes():
    rates = learning_rate_schedule(500, 0.005)
    assert len(rates) == 500 and rates[0] == 0.0 and rates[9] == pytest.approx(0.005)
    assert rates[300] == pytest.approx(0.005) and rates[-1] == pytest.approx(0.005 / 2**10)
    assert learning_rate_schedule(150, 0.1)[-1] == pytest.approx(0.1 / 2**10)
    assert np.all(learning_rate_schedule(50, 0.1)[10:] == 0.1)
    assert len(learning_rate_schedule(7, 0.1)) == 7


def test_bad_training_data_is_refused_clearly():
    images, masks = disc_set(range(3), size=64)
    net = build_network(TINY)
    with pytest.raises(TrainingDataError, match="3 images but 2 masks"):
        finetune(net, images, masks[:2], [], [], tiny_config())
    with pytest.raises(TrainingDataError, match=r"single-channel \(Y, X\)"):
        finetune(net, [np.stack([images[0]] * 2)] + images[1:], masks, [], [], tiny_config())
    with pytest.raises(TrainingDataError, match="min_train_masks"):
        finetune(net, images, masks, [], [], tiny_config(min_train_masks=100))
    with pytest.raises(TrainingDataError, match="integer label"):
        finetune(net, images, [m.astype(float) for m in masks], [], [], tiny_config())


# ------------------------------------------------------------------------------------------
# Tiny real trainings
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_loss_goes_down_and_is_deterministic_and_input_net_is_untouched():
    images, masks = disc_set(range(8))
    val_images, val_masks = disc_set(range(100, 102))
    torch.manual_seed(0)
    net = build_network(TINY)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    reports = []
    config = tiny_config(max_epochs=10)
    result = finetune(net, images, masks, val_images, val_masks, config, on_epoch=reports.append)
    losses = [r.train_loss for r in result.history]
    assert len(reports) == 10 and reports == result.history
    assert np.mean(losses[-3:]) < 0.7 * losses[0], losses
    assert min(r.val_loss for r in result.history) < result.history[0].val_loss
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert result.diameter == pytest.approx(training_diameters(masks)[0])
    assert float(result.net.diam_labels) == pytest.approx(result.diameter)
    assert not result.net.training
    # Same seed, same numbers (the schedule of the first epochs does not depend on max_epochs here).
    again = finetune(net, images, masks, val_images, val_masks, tiny_config(max_epochs=3))
    assert [r.train_loss for r in again.history] == losses[:3]


def test_early_stopping_waits_for_min_epochs_and_restores_the_best_checkpoint(monkeypatch):
    """Scripted validation losses drive the stopping rule; snapshots prove which weights come back."""
    scripted = [5.0, 6.0, 7.0, 8.0, 9.0, 4.0, 4.5, 4.1, 4.2, 1.0, 1.0]
    snapshots = []

    def scripted_validation_loss(net, batches, precision="fp32"):
        snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
        return scripted[len(snapshots) - 1]

    monkeypatch.setattr(training, "_validation_loss", scripted_validation_loss)
    images, masks = disc_set(range(2), size=64)
    config = tiny_config(max_epochs=len(scripted), min_epochs=6, patience=3, warmup_epochs=0)
    result = finetune(build_network(TINY), images, masks, images[:1], masks[:1], config)
    # Epochs 1-4 do not improve but come before min_epochs; epoch 5 is best; 6, 7, 8 exhaust patience.
    assert [r.val_loss for r in result.history] == scripted[:9]
    assert result.stopped_early and result.stop_reason == "patience"
    assert result.best_epoch == 5 and result.best_val_loss == 4.0
    assert [r.is_best for r in result.history] == [True, False, False, False, False, True, False, False, False]
    best, last = snapshots[5], snapshots[8]
    restored = result.net.state_dict()
    assert all(torch.equal(restored[k], best[k]) for k in best)
    assert not all(torch.equal(restored[k], last[k]) for k in last)


@pytest.mark.slow
def test_early_stopping_on_a_real_run_returns_the_minimum_validation_loss():
    images, masks = disc_set(range(6), size=80)
    val_images, val_masks = disc_set(range(100, 102), size=80)
    config = tiny_config(max_epochs=12, min_epochs=2, patience=2, warmup_epochs=0)
    result = finetune(build_network(TINY), images, masks, val_images, val_masks, config)
    val_losses = [r.val_loss for r in result.history]
    assert result.best_epoch == int(np.argmin(val_losses))
    if result.stop_reason == "patience":
        assert len(result.history) - 1 - max(result.best_epoch, config.min_epochs - 1) == config.patience
    # The returned net is the best checkpoint: it reproduces the best epoch's validation loss.
    prepared = training._prepare(val_images, val_masks, 30.0, config)
    batches = training._validation_crops(prepared, config)
    assert training._validation_loss(result.net, batches) == pytest.approx(min(val_losses), rel=1e-5)


@pytest.mark.slow
def test_should_stop_cancels_between_steps():
    images, masks = disc_set(range(8))
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 3  # 2 steps per epoch: cancel in the second epoch

    epochs = []
    with pytest.raises(TrainingCancelled, match="epoch 1"):
        finetune(
            build_network(TINY), images, masks, [], [], tiny_config(), on_epoch=epochs.append, should_stop=should_stop
        )
    assert len(epochs) == 1 and len(calls) == 4


@pytest.mark.slow
def test_time_limit_stops_gracefully_with_the_best_checkpoint():
    images, masks = disc_set(range(4), size=64)
    result = finetune(build_network(TINY), images, masks, [], [], tiny_config(max_epochs=1000, time_limit_s=1.5))
    assert result.stop_reason == "time_limit" and 1 <= len(result.history) < 1000
    assert result.best_epoch == int(np.argmin([r.train_loss for r in result.history]))
    assert math.isnan(result.history[0].val_loss)


# ------------------------------------------------------------------------------------------
# Base pretraining pieces and the shipped base
# ------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_BASE = REPO_ROOT / "models_zoo" / "weights" / "cellfuse-base-w16-v3.safetensors"


def test_base_split_is_disjoint_and_seeded(tmp_path):
    import tifffile

    from app.science.pretrain import load_annotated_dir, split_base_data

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for index in range(10):
        image, labels = disc_field(index, size=48, n=3)
        tifffile.imwrite(tmp_path / "images" / f"im{index}.tif", (image * 1000).astype(np.uint16))
        tifffile.imwrite(tmp_path / "labels" / f"im{index}.tif", labels.astype(np.uint16))
    data = load_annotated_dir(tmp_path)
    assert len(data) == 10 and data.masks[0].dtype == np.int32
    split = split_base_data(data, n_test=3, n_val=2, seed=0)
    names = [set(part.names) for part in (split.train, split.val, split.test)]
    assert [len(n) for n in names] == [5, 2, 3] and not (
        names[0] & names[1] or names[0] & names[2] or names[1] & names[2]
    )
    assert split_base_data(data, n_test=3, n_val=2, seed=0).test.names == split.test.names
    (tmp_path / "labels" / "im3.tif").unlink()
    with pytest.raises(TrainingDataError, match="no label image"):
        load_annotated_dir(tmp_path)
    with pytest.raises(TrainingDataError, match="images/ and labels/"):
        load_annotated_dir(tmp_path / "images")


@pytest.mark.slow
def test_finetuning_the_shipped_base_beats_the_base_on_a_synthetic_reporter():
    """Eight synthetic fields of a translocating reporter (nuclei) improve F1@0.5 over the base."""
    from app.science.synthetic import make_plate
    from app.science.training import evaluate_model
    from app.science.weights import load_model

    base, card = load_model(SHIPPED_BASE)
    assert card.architecture["widths"] == [16, 32, 64, 128]
    fields = make_plate(12, size=192, seed=11)
    channel = fields[0].channel_names.index("transloc")
    images = [f.image[channel] for f in fields]
    nuclei = [f.nuclei for f in fields]
    config = TrainingConfig(
        bsize=128,
        batch_size=4,
        max_epochs=20,
        min_epochs=20,
        warmup_epochs=1,
        learning_rate=0.002,
        min_train_masks=1,
        val_crops_per_image=2,
        seed=0,
    )
    tuned = finetune(base, images[:8], nuclei[:8], images[8:9], nuclei[8:9], config)
    test_images, test_masks = images[9:], nuclei[9:]
    # The base gets its best shot: the better of the mean and mean + 1 sd training diameters.
    base_f1 = max(evaluate_model(base, test_images, test_masks, d).scores.f1 for d in training_diameters(nuclei[:8]))
    tuned_f1 = evaluate_model(tuned.net, test_images, test_masks, tuned.diameter).scores.f1
    assert tuned_f1 > base_f1 + 0.05, (base_f1, tuned_f1)


def test_size_model_from_a_network_fits_its_styles():
    from app.science.training import predict_diameter, train_size_model

    images, masks = disc_set(range(3), size=64, n=3)
    net = build_network(TINY)
    model = train_size_model(net, images, masks, scales=(0.75, 1.0, 1.5))
    assert model.style_dim == TINY[-1] and model.n_train == 9 and model.diam_mean == 30.0
    diameter = predict_diameter(net, model, images[0])
    assert np.isfinite(diameter) and diameter >= 5.0


@pytest.mark.slow
def test_training_benchmark_runs_both_loops_on_tiny_settings():
    from app.benchmarks.training import run_training_benchmark

    lines = []
    result = run_training_benchmark(
        echo=lines.append, widths=TINY, n_train=4, n_val=1, epochs=1, batch_size=4, bsize=64, memory=False
    )
    assert result["ours_samples_per_s"] > 0 and result["cellpose_samples_per_s"] > 0
    # Wall times are rounded to 10 ms in the record, so the ratio agrees only roughly.
    assert result["speedup"] == pytest.approx(result["cellpose_wall_s"] / result["ours_wall_s"], rel=0.1)
    assert lines[-1].startswith("speed-up ratio: ")


def test_joint_model_takes_all_channels_and_trains_on_fields():
    import torch

    from app.science import backbone as bb
    from app.science.training import TrainingConfig, finetune
    from tests.science.test_backbone import disc_field

    torch.manual_seed(0)
    base = bb.build_network(bb.HALF_WIDTHS)
    joint = bb.joint_network(base, 3)
    assert bb.network_input_channels(joint) == 3 and bb.network_widths(joint) == bb.HALF_WIDTHS
    first = joint.state_dict()["downsample.down.res_down_0.conv.conv_0.2.weight"]
    assert first.shape[1] == 3
    torch.testing.assert_close(
        first[:, 1], base.state_dict()["downsample.down.res_down_0.conv.conv_0.2.weight"][:, 0] / 3
    )
    # a field whose three channels are the same image: the inflated net sees what the base sees
    image, labels = disc_field((64, 64), 4, seed=5)
    maps_joint = bb.predict_maps_joint(joint, np.stack([image] * 3), diameter=30.0)
    maps_base = bb.predict_maps(base, image, diameter=30.0, tile=False)
    assert maps_joint.maps.shape == (3, 64, 64)
    np.testing.assert_allclose(maps_joint.maps, maps_base.maps, atol=1e-3)
    fields = [np.stack([disc_field((64, 64), 4, seed=s)[0]] * 3) for s in range(3)]
    masks = [disc_field((64, 64), 4, seed=s)[1] for s in range(3)]
    config = TrainingConfig(
        max_epochs=1, min_epochs=0, batch_size=2, bsize=48, min_train_masks=1, microscopy_augment=False
    )
    result = finetune(joint, fields[:2], masks[:2], fields[2:], masks[2:], config, joint=True)
    assert bb.network_input_channels(result.net) == 3 and len(result.history) == 1
    with pytest.raises(ValueError, match="input channels"):
        finetune(joint, [f[:2] for f in fields[:2]], masks[:2], [], [], config, joint=True)


# ------------------------------------------------------------------------------------------
# Device, precision and the prefetching thread
# ------------------------------------------------------------------------------------------


def test_prefetched_batches_draw_the_rng_as_the_serial_loop_did():
    from app.science.augmentations import augment

    images, masks = disc_set(range(5), size=64)
    config = tiny_config(batch_size=2)
    prepared = training._prepare(images, masks, 30.0, config)
    augmentation = config.augmentation()
    prefetcher = training.BatchPrefetcher(
        prepared, np.random.default_rng(3), augmentation, batch_size=2, epochs=2, channels_last=False
    )
    try:
        got = [x.numpy() for _ in range(2) for x, _y in prefetcher.batches(3)]
    finally:
        prefetcher.close()
    rng = np.random.default_rng(3)
    expected = []
    for _ in range(2):
        order = rng.permutation(5)
        for start in range(0, 5, 2):
            crops = [
                augment(prepared.images[i], prepared.targets[i], rng, augmentation, zoom=prepared.zooms[i])[0]
                for i in order[start : start + 2]
            ]
            expected.append(np.stack(crops))
    assert len(got) == len(expected) == 6
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a[:, 0:1], b)
        assert not a[:, 1].any()  # the zero second channel


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_training_runs_on_the_device_and_records_it(device):
    images, masks = disc_set(range(4), size=64)
    net = build_network(TINY)
    result = finetune(net, images, masks, images[:1], masks[:1], tiny_config(max_epochs=2), device=device)
    assert result.device.startswith(device) and result.precision == "fp32"
    assert next(result.net.parameters()).device.type == device
    assert all(np.isfinite(r.train_loss) for r in result.history)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_reduced_precision_training_learns_like_fp32(device):
    from app.science.device import default_precision

    precision = default_precision(torch.device(device), "training")
    if precision == "fp32":
        pytest.skip("no reduced precision is native here")
    images, masks = disc_set(range(8))
    val_images, val_masks = disc_set(range(100, 102))
    config = tiny_config(max_epochs=8)
    fp32 = finetune(build_network(TINY), images, masks, val_images, val_masks, config, device=device)
    low = finetune(
        build_network(TINY), images, masks, val_images, val_masks, config, device=device, precision=precision
    )
    assert low.precision == precision
    first, last = low.history[0].train_loss, low.history[-1].train_loss
    assert last < 0.8 * first
    assert low.best_val_loss == pytest.approx(fp32.best_val_loss, rel=0.25)
    with pytest.raises(ValueError, match="precision"):
        finetune(build_network(TINY), images, masks, [], [], config, precision="int8")


def test_recentring_crop_bounds_the_zoomed_image_and_keeps_its_centre():
    from app.science.training import _centre_crop_for_zoom

    image = np.arange(600 * 800, dtype=np.float32).reshape(600, 800)
    crop = _centre_crop_for_zoom(image, 4.0, max_side=1024)
    assert crop.shape == (256, 256)
    assert crop[128, 128] == image[300, 400]  # centred
    assert _centre_crop_for_zoom(image, 0.5, max_side=1024).shape == image.shape  # zoom-out: whole image


@pytest.mark.slow
def test_image_diameter_estimate_runs_the_recentred_passes_on_the_shipped_base():
    from app.science.size_model import SizeModel
    from app.science.training import estimate_image_diameter, predict_diameter
    from app.science.weights import load_model

    net, card = load_model(SHIPPED_BASE)
    size_model = SizeModel.from_dict(card.size_model)
    image, labels = disc_field(3, size=160, n=8)
    plain = estimate_image_diameter(net, size_model, image, tile=False, recentre_iterations=0)
    recentred = estimate_image_diameter(
        net, size_model, image, tile=False, recentre_iterations=2, recentre_tolerance=0.0
    )
    assert plain.style_diameter == pytest.approx(predict_diameter(net, size_model, image), rel=1e-5)
    assert recentred.style_diameter != pytest.approx(plain.style_diameter, rel=1e-3)
    assert recentred.source == "masks" and recentred.n_objects > 0
