"""Channel-subset ranking on ideal maps built from label images."""

from __future__ import annotations

import numpy as np
import pytest

from app.science import backbone
from app.science.backbone import ChannelMaps
from app.science.channel_sets import SubsetScore, rank_channel_subsets
from tests.science.test_backbone import disc_field
from tests.science.test_flow_fusion import ideal_maps


def _images(n: int = 2):
    truths, maps = [], []
    for seed in range(n):
        _, labels = disc_field((96, 96), 8, seed=40 + seed)
        ids = np.arange(1, labels.max() + 1)
        good = ideal_maps(labels)
        half = ideal_maps(labels, keep=ids[ids % 2 == 0])
        _, junk_labels = disc_field((96, 96), 6, seed=90 + seed, radius=(4.0, 6.0))
        junk = ideal_maps(junk_labels)
        truths.append(labels)
        maps.append([good, half, ChannelMaps(junk, np.zeros(4, np.float32))])
    return maps, truths


def test_flow_fusion_ranking_puts_the_good_channel_first():
    maps, truths = _images()
    ranking = rank_channel_subsets(maps, truths, ["good", "half", "junk"], diameter=22.0, diam_mean=30.0)
    assert len(ranking) == 7
    assert ranking[0].channels == ("good",) and ranking[0].f1 == 1.0
    f1s = [r.f1 for r in ranking]
    assert f1s == sorted(f1s, reverse=True)
    junk = next(r for r in ranking if r.channels == ("junk",))
    assert junk.f1 == 0.0 and junk.precision == 0.0
    assert all(isinstance(r, SubsetScore) for r in ranking)


def test_ties_go_to_fewer_channels_then_earlier_ones():
    maps, truths = _images(1)
    same = [[m[0], m[0]] for m in maps]
    ranking = rank_channel_subsets(same, truths, ["a", "b"], diameter=22.0, diam_mean=30.0)
    assert [r.channels for r in ranking] == [("a",), ("b",), ("a", "b")]


def test_label_fusion_reconstructs_each_channel_once(monkeypatch):
    maps, truths = _images()
    calls = []
    original = backbone.masks_from_maps

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(backbone, "masks_from_maps", counting)
    ranking = rank_channel_subsets(
        maps, truths, ["good", "half", "junk"], diameter=22.0, diam_mean=30.0, method="voting", metric="recall"
    )
    assert len(calls) == 2 * 3  # images x channels, not per subset
    assert ranking[0].channels == ("good",) and ranking[0].recall == 1.0
    assert [r.recall for r in ranking] == sorted((r.recall for r in ranking), reverse=True)


def test_bad_inputs_raise_clear_value_errors():
    maps, truths = _images(1)
    with pytest.raises(ValueError, match="rank by one of"):
        rank_channel_subsets(maps, truths, ["a", "b", "c"], diameter=22.0, diam_mean=30.0, metric="accuracy")
    with pytest.raises(ValueError, match="valid methods"):
        rank_channel_subsets(maps, truths, ["a", "b", "c"], diameter=22.0, diam_mean=30.0, method="mean")
    with pytest.raises(ValueError, match="unique"):
        rank_channel_subsets(maps, truths, ["a", "a", "c"], diameter=22.0, diam_mean=30.0)
    with pytest.raises(ValueError, match="expected 2"):
        rank_channel_subsets(maps, truths, ["a", "b"], diameter=22.0, diam_mean=30.0)
    with pytest.raises(ValueError, match="ground-truth"):
        rank_channel_subsets(maps, truths * 2, ["a", "b", "c"], diameter=22.0, diam_mean=30.0)
