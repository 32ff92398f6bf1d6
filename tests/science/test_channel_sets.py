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


def _dim_without(labels: np.ndarray, missing: set[int]) -> np.ndarray:
    """Ideal maps in which the cells in ``missing`` are only dimly seen (logit -1, no flow)."""
    maps = ideal_maps(labels)
    hole = np.isin(labels, list(missing))
    maps[:2, hole] = 0.0
    maps[2, hole] = -1.0
    return maps


def test_a_bigger_set_that_wins_by_noise_loses_to_the_smaller_one():
    from app.science.channel_sets import choose_channel_set

    truths, maps = [], []
    for i in range(6):
        _, labels = disc_field((96, 96), 8, seed=60 + i)
        truths.append(labels)
        # a misses one cell on field 0, b one cell on field 1: together they see everything
        maps.append([_dim_without(labels, {1} if i == 0 else set()), _dim_without(labels, {2} if i == 1 else set())])
    ranking = rank_channel_subsets(maps, truths, ["a", "b"], diameter=22.0, diam_mean=30.0, n_boot=500)
    assert ranking[0].channels == ("a", "b") and ranking[0].f1 == 1.0
    assert all(r.within_noise for r in ranking)
    low, high = ranking[1].f1_interval
    assert low < ranking[1].f1 <= high <= 1.0 and ranking[1].n_fields == 6
    assert choose_channel_set(ranking) == ("a",)


def test_a_set_clearly_better_than_its_parts_is_chosen():
    from app.science.channel_sets import choose_channel_set

    truths, maps = [], []
    for i in range(5):
        _, labels = disc_field((96, 96), 8, seed=70 + i)
        ids = np.arange(1, labels.max() + 1)
        truths.append(labels)
        maps.append([ideal_maps(labels, keep=ids[ids % 3 != k]) for k in range(3)])
    ranking = rank_channel_subsets(maps, truths, ["a", "b", "c"], diameter=22.0, diam_mean=30.0, n_boot=500)
    assert ranking[0].channels == ("a", "b", "c")
    assert [r.within_noise for r in ranking] == [True] + [False] * 6
    assert all(r.p_best_better >= 0.9 for r in ranking[1:])
    assert choose_channel_set(ranking) == ("a", "b", "c")
