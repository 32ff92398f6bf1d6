"""ISL pretraining, annotation-free (marker-controlled) training and the classical baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.science.classical import (
    classical_segment,
    complete_markers,
    detect_markers,
    estimate_diameter,
)
from app.science.isl import (
    ISLConfig,
    ISLDataError,
    pearson,
    predict_stain,
    pretrain_isl,
    stain_target,
)
from app.science.metrics import score_set
from app.science.self_training import (
    SelfTrainConfig,
    _prepare,
    graphcut_foreground,
    instances_from_patches,
    patch_loss,
    self_train,
)


def discs(shape=(96, 96), centres=((30, 30), (30, 62), (70, 46)), radius=9) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = i
    return labels


def stain_of(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (100 + 800 * (labels > 0) + rng.normal(0, 20, labels.shape)).astype(np.float32)


def test_classical_finds_the_discs_from_doh_markers():
    labels = discs()
    image = stain_of(labels)
    assert 14 < estimate_diameter(image) < 22
    markers = detect_markers(image, diameter=18)
    hit = {int(labels[r, c]) for r, c in markers} - {0}
    assert hit == {1, 2, 3}
    pred = classical_segment(image, markers)
    assert score_set([labels], [pred]).f1 == 1.0


def test_complete_markers_adds_one_per_unmarked_blob():
    labels = discs()
    completed = complete_markers(np.array([[30, 30]]), labels > 0)
    assert len(completed) == 3
    assert {int(labels[r, c]) for r, c in completed} == {1, 2, 3}


def test_graphcut_foreground_removes_speckle_that_a_threshold_keeps():
    labels = discs()
    image = stain_of(labels)
    image[5, 5] = image[5, 80] = 5000  # two hot pixels
    fg = graphcut_foreground(image, smoothness=4.0)
    assert not fg[5, 5] and not fg[5, 80]
    assert (fg == (labels > 0)).mean() > 0.97


def test_patch_loss_rewards_area_and_penalises_overlap_and_background():
    labels = discs(centres=((48, 40), (48, 58)))
    markers = np.array([[48, 40], [48, 58]])
    prepared = _prepare(stain_of(labels), labels > 0, markers, 18.0, 37)

    def loss_of(masks: np.ndarray) -> float:
        logits = torch.from_numpy(np.where(masks, 6.0, -6.0).astype(np.float32))
        return float(patch_loss(logits, prepared.index, prepared.background, prepared.padded_size))

    own = np.stack([np.pad(labels == i, 18)[m[0] : m[0] + 37, m[1] : m[1] + 37] for i, m in zip((1, 2), markers)])
    nothing = np.zeros_like(own)
    both = np.stack([np.pad(labels > 0, 18)[m[0] : m[0] + 37, m[1] : m[1] + 37] for m in markers])
    everything = np.ones_like(own)
    assert loss_of(own) < loss_of(nothing)  # covering foreground pays
    assert loss_of(own) < loss_of(both)  # claiming the neighbour's pixels costs
    assert loss_of(own) < loss_of(everything)  # claiming background costs
    instances = instances_from_patches(torch.from_numpy(own.astype(np.float32)), prepared)
    assert score_set([labels], [instances]).f1 == 1.0


@pytest.mark.slow
def test_self_training_segments_touching_nuclei_without_annotation():
    labels = discs(centres=((30, 30), (30, 50), (70, 46), (68, 75)))
    images = [stain_of(labels, s) for s in range(2)]
    result = self_train(images, diameter=18.0, config=SelfTrainConfig(epochs=40, width=12))
    assert result.history[-1].loss < result.history[0].loss
    scores = score_set([labels, labels], result.labels)
    assert scores.f1 >= 0.75, scores.as_dict()


def test_isl_rejects_unpaired_or_misshapen_input():
    with pytest.raises(ISLDataError):
        pretrain_isl([np.zeros((32, 32))], [], [], [])
    with pytest.raises(ISLDataError):
        pretrain_isl([np.zeros((32, 32))], [np.zeros((16, 16))], [], [])


def test_stain_target_spans_a_logit_range():
    target = stain_target(stain_of(discs()))
    assert target.min() == pytest.approx(-3.0) and target.max() == pytest.approx(3.0)


@pytest.mark.slow
def test_isl_pretraining_learns_the_stain_and_keeps_the_best_checkpoint():
    torch.set_num_threads(1)
    labels = [discs(centres=((20 + 10 * s, 30), (60, 40 + 8 * s), (40, 70))) for s in range(4)]
    # the source is a blurred "reporter" that shows the same objects dimmer and inverted in texture
    sources = [
        np.float32(50 + 200 * (m > 0)) + np.random.default_rng(s).normal(0, 30, m.shape).astype(np.float32)
        for s, m in enumerate(labels)
    ]
    stains = [stain_of(m, s) for s, m in enumerate(labels)]
    config = ISLConfig(bsize=64, batch_size=4, max_epochs=12, min_epochs=2, patience=4, learning_rate=0.005)
    result = pretrain_isl(sources[:3], stains[:3], sources[3:], stains[3:], config, widths=(8, 16, 32, 64))
    assert result.history[result.best_epoch].val_loss == pytest.approx(result.best_val_loss)
    assert result.best_val_loss < result.history[0].val_loss
    assert result.val_correlation > 0.5
    predicted = predict_stain(result.net, sources[3])
    assert predicted.shape == sources[3].shape
    assert pearson(predicted, stains[3]) > 0.5
    # the result is an ordinary CPnet: it is the init of a fine-tune
    from app.science.training import TrainingConfig, finetune

    tuned = finetune(
        result.net,
        sources[:2],
        labels[:2],
        [],
        [],
        TrainingConfig(max_epochs=1, min_epochs=0, batch_size=2, bsize=64, min_train_masks=1),
    )
    assert set(tuned.net.state_dict()) == set(result.net.state_dict())


BBBC022 = "/work/shared/data/bbbc022_cellpainting_crop/IXMtest_A02_s9.tif"


@pytest.mark.slow
def test_isl_smoke_on_a_real_cell_painting_field():
    """Real CC0 Cell Painting (BBBC022): w2 and w3 stains -> the Hoechst DNA stain (w1), no masks."""
    import os

    import tifffile

    if not os.path.exists(BBBC022):
        pytest.skip("the BBBC022 crop is not in ../shared/data on this machine")
    torch.set_num_threads(1)
    field = tifffile.imread(BBBC022).astype(np.float32)  # (3, 395, 695)
    tiles = [field[:, :192, x : x + 192] for x in (0, 192, 384)]
    config = ISLConfig(bsize=96, batch_size=4, max_epochs=4, min_epochs=1, patience=3, learning_rate=0.005)
    result = pretrain_isl(
        [t[1:] for t in tiles[:2]],
        [t[0] for t in tiles[:2]],
        [tiles[2][1:]],
        [tiles[2][0]],
        config,
        widths=(8, 16, 32, 64),
    )
    assert len(result.history) >= 1 and np.isfinite(result.best_val_loss)
    assert result.best_val_loss <= result.history[0].val_loss
    assert -1.0 <= result.val_correlation <= 1.0
    assert predict_stain(result.net, tiles[2][1]).shape == (192, 192)
