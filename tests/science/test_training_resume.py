"""Resuming a fine-tune from its epoch checkpoint gives the same model as an uninterrupted run, and
a checkpoint survives a round trip through torch.save / torch.load(weights_only=True)."""

from __future__ import annotations

import io

import pytest
import torch

from app.science.backbone import build_network
from app.science.training import TrainingCheckpoint, finetune
from tests.science.test_training import TINY, disc_set, tiny_config


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_resumed_training_equals_an_uninterrupted_run():
    torch.set_num_threads(1)
    images, masks = disc_set(range(4))
    val_images, val_masks = disc_set(range(100, 102))
    torch.manual_seed(0)
    net = build_network(TINY)
    config = tiny_config(max_epochs=5)
    whole = finetune(net, images, masks, val_images, val_masks, config)

    saved: list[bytes] = []

    def keep(checkpoint: TrainingCheckpoint) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint.as_state(), buffer)
        saved.append(buffer.getvalue())
        if checkpoint.epoch == 2:
            raise _Stop  # the worker dies after epoch 2 was saved

    with pytest.raises(_Stop):
        finetune(net, images, masks, val_images, val_masks, config, on_checkpoint=keep)
    state = torch.load(io.BytesIO(saved[-1]), weights_only=True)  # no pickled objects in a checkpoint
    checkpoint = TrainingCheckpoint.from_state(state)
    assert checkpoint.epoch == 2 and [r.epoch for r in checkpoint.history] == [0, 1, 2]
    epochs_run = []
    resumed = finetune(
        net,
        images,
        masks,
        val_images,
        val_masks,
        config,
        resume_from=checkpoint,
        on_epoch=lambda r: epochs_run.append(r.epoch),
    )
    assert epochs_run == [3, 4]  # only the epochs after the checkpoint ran again
    assert [r.epoch for r in resumed.history] == [0, 1, 2, 3, 4]
    assert [r.train_loss for r in resumed.history] == pytest.approx([r.train_loss for r in whole.history], rel=1e-5)
    assert resumed.best_epoch == whole.best_epoch
    for name, tensor in whole.net.state_dict().items():
        assert torch.allclose(tensor, resumed.net.state_dict()[name], atol=1e-5), name
