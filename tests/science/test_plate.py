"""segment_fields: a plate through the shipped base, batched and overlapped, equal to segment_field."""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile

from app.science.metrics import match
from app.science.plate import SegmentTask, segment_fields
from app.science.segmentation import ChannelModel, SegmentationInputError, segment_field

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "models_zoo" / "weights" / "cellfuse-base-w16-v3.safetensors"
DSB = Path("/work/shared/data/dsb2018_fluo/images")


@functools.cache
def base_model() -> ChannelModel:
    from app.science.weights import load_model

    net, card = load_model(BASE)
    return ChannelModel(net, diameter=card.diameter, diam_mean=card.diam_mean, name="base")


def real_fields(n: int, size: int = 128) -> list[np.ndarray]:
    """(2, size, size) fields: crops of DSB2018 nuclei images (real objects), or synthetic ones."""
    fields = []
    if DSB.is_dir():
        for path in sorted(DSB.glob("*.tif")):
            image = np.asarray(tifffile.imread(path), np.float32)
            if image.ndim != 2 or min(image.shape) < size:
                continue
            crop = image[:size, :size]
            fields.append(np.stack([crop, crop[::-1, ::-1].copy()]))
            if len(fields) == n:
                return fields
    from app.science.synthetic import make_plate

    for field in make_plate(n - len(fields), size=size, seed=3):
        fields.append(np.asarray(field.image[:2], np.float32))
    return fields


@pytest.mark.slow
def test_segment_fields_equals_segment_field_in_order_and_isolates_bad_fields():
    model = base_model()
    fields = real_fields(5)
    items = [(f"f{i}", field) for i, field in enumerate(fields)]
    items.insert(2, ("bad", np.zeros((3, 128, 128), np.float32)))  # 3 channels for 2 models
    items.insert(4, ("unreadable", lambda: (_ for _ in ()).throw(OSError("disk gone"))))
    outcomes = list(segment_fields(items, [model, model], batch_fields=2))
    assert [o.key for o in outcomes] == [key for key, _ in items]
    assert [o.index for o in outcomes] == list(range(len(items)))
    errors = {o.key: o.error for o in outcomes if o.error is not None}
    assert set(errors) == {"bad", "unreadable"}
    assert "channel models" in str(errors["bad"]) and "disk gone" in str(errors["unreadable"])
    objects = 0
    for outcome, field in zip([o for o in outcomes if o.error is None], fields):
        alone = segment_field(field, [model, model])
        batched = outcome.result
        np.testing.assert_allclose(batched.fused_maps, alone.fused_maps, atol=2e-3)
        assert match(alone.labels, batched.labels).f1 >= 0.99 or alone.labels.max() == batched.labels.max() == 0
        objects += int(alone.labels.max())
        assert outcome.image.shape == field.shape
        assert {"prepare", "maps", "masks", "total"} <= set(outcome.timings)
    assert objects > 10  # real nuclei were compared, not empty masks


@pytest.mark.slow
def test_several_tasks_per_field_pick_their_channels():
    model = base_model()
    field = real_fields(1)[0]
    plate = np.stack([field[0], field[1], field[0]])
    tasks = {
        "nuclei": SegmentTask((model,), channels=(0,)),
        "cells": SegmentTask((model, model), channels=(1, 2), method="voting"),
    }
    (outcome,) = list(segment_fields([("w1", plate)], tasks))
    assert set(outcome.results) == {"nuclei", "cells"}
    alone = segment_field(plate[[0]], [model])
    assert match(alone.labels, outcome.results["nuclei"].labels).f1 >= 0.99
    assert outcome.results["cells"].channel_labels is not None
    with pytest.raises(KeyError, match="pick one"):
        _ = outcome.result


def test_closing_early_stops_every_thread_and_source_errors_reach_the_caller():
    model = base_model()
    fields = real_fields(2, size=64)

    def endless():
        while True:
            yield "f", fields[0]

    generator = segment_fields(endless(), [model, model], batch_fields=1)
    next(generator)
    generator.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("cellfuse-")]

    def broken():
        yield "ok", fields[1]
        raise RuntimeError("listing the plate failed")

    seen = []
    with pytest.raises(RuntimeError, match="listing the plate failed"):
        for outcome in segment_fields(broken(), [model, model]):
            seen.append(outcome.key)
    assert seen == ["ok"]


def test_a_network_thread_that_dies_raises_in_the_caller_instead_of_hanging_it(monkeypatch):
    import app.science.plate as plate

    model = base_model()
    fields = real_fields(3, size=64)

    def dies(*args, **kwargs):
        raise SystemExit("the network thread died")  # not an Exception: no field can keep it as its error

    monkeypatch.setattr(plate, "_run_networks", dies)
    caught: list[BaseException] = []

    def consume() -> None:
        try:
            list(segment_fields([(i, f) for i, f in enumerate(fields)], [model, model], batch_fields=1))
        except BaseException as error:  # noqa: BLE001 - what the caller sees is the point of the test
            caught.append(error)

    caller = threading.Thread(target=consume, daemon=True)  # a hang fails the test instead of the suite
    caller.start()
    caller.join(30)
    assert not caller.is_alive(), "the caller still waits for fields that will never come"
    assert len(caught) == 1 and isinstance(caught[0], SystemExit) and "network thread died" in str(caught[0])
    assert not [t for t in threading.enumerate() if t.name.startswith("cellfuse-")]


def test_on_wait_sees_the_field_inside_the_network_and_stops_it_between_passes():
    """The caller learns where a long field is, and what it raises stops the engine after the pass
    under way: the channels after it never reach their nets."""
    import copy

    model = base_model()
    nets = [copy.deepcopy(model.net) for _ in range(4)]  # four nets: four passes per field
    models = [
        ChannelModel(n, diameter=model.diameter, diam_mean=model.diam_mean, name=f"c{i}") for i, n in enumerate(nets)
    ]
    called: list[int] = []
    second_pass_reported = threading.Event()

    def hold_second_pass(*_args) -> None:
        called.append(1)
        second_pass_reported.wait(30)  # holds the pass until the caller has seen the first one

    for i, net in enumerate(nets):
        net.register_forward_hook(lambda *_a, i=i: called.append(i) if i != 1 else hold_second_pass())
    field = np.concatenate(real_fields(2, size=64))  # (4, 64, 64)
    seen = []

    class Cancelled(Exception):
        pass

    def on_wait(stages) -> None:
        seen.extend(stages)
        if any(s.stage == "network" and s.fraction > 0.1 for s in stages):
            second_pass_reported.set()
            raise Cancelled

    with pytest.raises(Cancelled):
        list(segment_fields([("only", field)], models, on_wait=on_wait, wait_interval=0.01))
    assert seen[0].key == "only" and seen[0].index == 0
    assert [s.stage for s in seen if s.stage == "network"] and max(s.fraction for s in seen) < 0.7
    assert called == [0, 1]  # passes 3 and 4 never ran
    assert not [t for t in threading.enumerate() if t.name.startswith("cellfuse-")]


@pytest.mark.slow
def test_bf16_masks_agree_with_fp32():
    """Pooled over ~120 nuclei: on 128² crops with 2-6 nuclei each, one nucleus tipped by bf16's
    rounding (CPUs with AMX round differently from those without) was a field F1 of 0.8."""
    model = base_model()
    fields = real_fields(4, size=256)
    fp32 = [o.result.labels for o in segment_fields([(i, f) for i, f in enumerate(fields)], [model, model])]
    bf16 = [
        o.result.labels
        for o in segment_fields([(i, f) for i, f in enumerate(fields)], [model, model], precision="bf16")
    ]
    matches = [match(a, b) for a, b in zip(fp32, bf16)]
    tp, fp, fn = (sum(getattr(m, k) for m in matches) for k in ("tp", "fp", "fn"))
    assert tp > 50 and 2 * tp / (2 * tp + fp + fn) >= 0.95


def test_bad_task_options_are_refused_before_any_work():
    model = base_model()
    with pytest.raises(SegmentationInputError, match="valid methods"):
        segment_fields([], [model], method="average")
    with pytest.raises(SegmentationInputError, match="on each SegmentTask"):
        segment_fields([], {"a": SegmentTask((model,))}, min_size=3)
    with pytest.raises(SegmentationInputError, match="channel indices"):
        SegmentTask((model,), channels=(0, 1))
