"""segment_field end to end: one model per channel, Flow Fusion and label fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.science import backbone as bb
from app.science.metrics import match
from app.science.segmentation import ChannelModel, segment_field
from tests.science.test_backbone import disc_field, disc_trained_net


def field_with_missing_cells(seed: int):
    """Three channels of one disc field; channel k lacks every third disc (ids = k mod 3)."""
    image, labels = disc_field((128, 128), 12, seed=seed)
    rng = np.random.default_rng(seed)
    background = image * (labels == 0)
    channels = []
    for k in range(3):
        shown = (labels > 0) & (labels % 3 != k)
        noise = 0.1 * rng.standard_normal(labels.shape)
        channels.append(np.where(shown, image, background + noise * (labels > 0)))
    return np.stack(channels).astype(np.float32), labels


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flow_fusion", "voting", "staple"])
def test_fusion_finds_cells_that_single_channels_miss(method):
    net = disc_trained_net()
    field, labels = field_with_missing_cells(seed=31)
    models = [ChannelModel(net, diameter=22.0, diam_mean=30.0, name=f"c{k}") for k in range(3)]
    result = segment_field(field, models, method=method)
    assert match(labels, result.labels).f1 >= 0.9
    single = segment_field(field[:1], models[:1])
    assert match(labels, single.labels).recall < 0.8
    assert len(result.channel_maps) == 3 and result.labels.dtype == np.int32
    if method == "flow_fusion":
        assert result.fused_maps.shape == (3, 128, 128) and result.channel_labels is None
        assert {"maps", "fuse", "masks", "total"} <= set(result.timings)
    else:
        assert result.fused_maps is None and len(result.channel_labels) == 3
    assert result.timings["total"] >= result.timings["maps"] > 0


def test_bad_requests_raise_clear_value_errors():
    torch.manual_seed(0)
    model = ChannelModel(bb.build_network(bb.HALF_WIDTHS), diameter=20.0, diam_mean=30.0, name="a")
    field = np.zeros((2, 32, 32), np.float32)
    with pytest.raises(ValueError, match="one model per channel"):
        segment_field(field, [model])
    with pytest.raises(ValueError, match="valid methods: flow_fusion"):
        segment_field(field, [model, model], method="average")
    with pytest.raises(ValueError, match="label-fusion methods only"):
        segment_field(field, [model, model], fusion_params={"alpha": 1.0})
    with pytest.raises(ValueError, match="flow_fusion only"):
        segment_field(field, [model, model], method="voting", weights=[1, 1])
    with pytest.raises(ValueError, match="positive"):
        ChannelModel(model.net, diameter=0.0, diam_mean=30.0, name="b")


def test_untrained_models_run_every_method_and_return_valid_labels():
    torch.manual_seed(0)
    nets = [bb.build_network(bb.HALF_WIDTHS) for _ in range(2)]
    models = [ChannelModel(net, diameter=20.0, diam_mean=30.0, name=str(k)) for k, net in enumerate(nets)]
    field = np.stack([disc_field((48, 64), 4, seed=s)[0] for s in (1, 2)])
    for method in ("flow_fusion", "staple", "simple", "voting", "majority_voting"):
        result = segment_field(field, models, method=method, min_size=5)
        assert result.labels.shape == (48, 64) and result.labels.dtype == np.int32
        assert result.labels.min() >= 0


def test_fitted_fusion_parameters_are_applied_and_recorded():
    torch.manual_seed(0)
    nets = [bb.build_network(bb.HALF_WIDTHS) for _ in range(2)]
    models = [ChannelModel(net, diameter=20.0, diam_mean=30.0, name=name) for net, name in zip(nets, ("a", "b"))]
    field = np.stack([disc_field((48, 64), 4, seed=s)[0] for s in (1, 2)])
    # the record lists channels in another order: weights follow the names
    record = {
        "method": "weights",
        "channels": ["b", "a"],
        "weights": [0.0, 1.0],
        "flow_threshold": 0.5,
        "cellprob_threshold": -1.0,
        "confidence": None,
    }
    fused = segment_field(field, models, fusion=record, min_size=5)
    alone = segment_field(field[:1], models[:1], flow_threshold=0.5, cellprob_threshold=-1.0, min_size=5)
    np.testing.assert_array_equal(fused.labels, alone.labels)
    assert fused.settings["weights"] == [1.0, 0.0] and fused.settings["flow_threshold"] == 0.5
    assert fused.settings["cellprob_threshold"] == -1.0 and fused.settings["weights_source"] == "fitted (weights)"
    default = segment_field(field, models, min_size=5)
    assert default.settings["weights"] == [0.5, 0.5] and default.settings["flow_threshold"] == 0.7
    with pytest.raises(ValueError, match="not \\['a', 'c'\\]"):
        segment_field(field, [models[0], ChannelModel(nets[1], 20.0, 30.0, "c")], fusion=record)
    with pytest.raises(ValueError, match="flow_fusion only"):
        segment_field(field, models, method="staple", fusion=record)


def test_a_checkpoint_between_channels_can_stop_a_field():
    """A job's cancellation takes effect between channels, not only between fields."""
    from app.science.backbone import build_network
    from app.science.segmentation import ChannelModel, segment_field

    nets = [build_network((8, 16, 32, 64)) for _ in range(2)]
    models = [ChannelModel(net, diameter=30.0, diam_mean=30.0, name=f"c{i}") for i, net in enumerate(nets)]
    calls = []

    class Stop(Exception):
        pass

    def checkpoint():
        calls.append(1)
        raise Stop

    with pytest.raises(Stop):
        segment_field(np.zeros((2, 64, 64), np.float32), models, checkpoint=checkpoint)
    assert calls == [1]


def test_a_single_channel_gets_its_own_flow_threshold_not_the_fused_one():
    """One channel's maps are not fused: Cellpose's 0.4 (or the model's stored value), recorded."""
    from app.science.backbone import build_network
    from app.science.flow_fusion import FUSED_FLOW_THRESHOLD

    net = build_network((8, 16, 32, 64))
    plain = segment_field(np.zeros((1, 64, 64), np.float32), [ChannelModel(net, 30.0, 30.0, "a")])
    assert plain.settings["flow_threshold"] == 0.4 != FUSED_FLOW_THRESHOLD
    assert plain.settings["cellprob_threshold"] == 0.0
    stored = segment_field(
        np.zeros((1, 64, 64), np.float32),
        [ChannelModel(net, 30.0, 30.0, "a", flow_threshold=0.55, cellprob_threshold=-1.0)],
    )
    assert stored.settings["flow_threshold"] == 0.55 and stored.settings["cellprob_threshold"] == -1.0
    two = segment_field(
        np.zeros((2, 64, 64), np.float32), [ChannelModel(net, 30.0, 30.0, "a"), ChannelModel(net, 30.0, 30.0, "b")]
    )
    assert two.settings["flow_threshold"] == FUSED_FLOW_THRESHOLD
    voting = segment_field(
        np.zeros((2, 64, 64), np.float32),
        [ChannelModel(net, 30.0, 30.0, "a", flow_threshold=0.3), ChannelModel(net, 30.0, 30.0, "b")],
        method="voting",
    )
    assert voting.settings["flow_thresholds"] == [0.3, 0.4] and voting.settings["cellprob_thresholds"] == [0.0, 0.0]
    mixed = segment_field(
        np.zeros((2, 64, 64), np.float32),
        [ChannelModel(net, 30.0, 30.0, "a", cellprob_threshold=-0.5), ChannelModel(net, 30.0, 30.0, "b")],
        method="voting",
    )
    assert mixed.settings["cellprob_thresholds"] == [-0.5, 0.0] and mixed.settings["cellprob_threshold"] is None
