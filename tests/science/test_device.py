"""Device and precision choice, the model cache, and every device path on an explicit device.

Each path runs here on ``cpu``; the ``gpu``-marked twins run the same code on ``cuda`` where a GPU
is present (``scripts/gpu_check.sh``) and are skipped elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.science import backbone as bb
from app.science.device import (
    DeviceError,
    autocast,
    default_precision,
    module_device,
    module_nbytes,
    parse_device_spec,
    resolve_device,
    resolve_precision,
)
from app.science.metrics import match
from app.science.model_cache import ModelCache
from tests.science.test_plate import BASE, base_model, real_fields


def cuda_devices() -> list[str]:
    return ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def test_device_specs_parse_and_resolve_without_a_gpu():
    assert parse_device_spec("cuda:2") == ("cuda", 2)
    assert parse_device_spec("cuda") == ("cuda", 0)
    assert parse_device_spec("AUTO") == ("auto", None)
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:0", ""):
        with pytest.raises(DeviceError, match="auto, cpu, cuda or cuda:N"):
            parse_device_spec(bad)
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("auto", cpu) == default_precision(cpu) == "fp32"  # inference: exact by default
    assert resolve_precision("auto", cpu, "training") in ("fp32", "bf16")
    with pytest.raises(DeviceError, match="precision must be one of"):
        resolve_precision("int8", cpu)
    with autocast(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu")
        x = torch.ones(2, 2)
        assert (x @ x).dtype == torch.bfloat16


def test_model_cache_is_lru_by_bytes_and_keyed_by_device():
    loads = []

    def loader(name):
        def load():
            loads.append(name)
            return name

        return load

    cache = ModelCache(max_bytes=250)
    size = {"a": 100, "b": 100, "c": 100, "huge": 1000}.get
    assert cache.get_or_load("A", "cpu", loader("a"), size_of=size) == "a"
    assert cache.get_or_load("a", "cpu", loader("a"), size_of=size) == "a"  # sha256 is case-insensitive
    cache.get_or_load("b", "cpu", loader("b"), size_of=size)
    cache.get_or_load("a", "cpu", loader("a"), size_of=size)  # "a" becomes most recent
    cache.get_or_load("c", "cpu", loader("c"), size_of=size)  # over budget: the LRU "b" goes
    assert cache.keys() == [("a", "cpu"), ("c", "cpu")] and cache.nbytes == 200
    cache.get_or_load("a", "cuda:0", loader("a"), size_of=size)  # same weights, other device
    assert loads == ["a", "b", "c", "a"]
    assert cache.get_or_load("huge", "cpu", loader("huge"), size_of=size) == "huge"  # served, not kept
    assert cache.get("huge", "cpu") is None and cache.nbytes <= 250
    stats = cache.stats()
    assert stats["hits"] == 2 and stats["misses"] == 5 and stats["evictions"] == 2
    with pytest.raises(ValueError):
        ModelCache(max_bytes=-1)


def test_model_cache_measures_networks_in_bytes():
    net = bb.build_network((8, 16, 32, 64))
    cache = ModelCache()
    assert cache.get_or_load("x", "cpu", lambda: net) is net
    floats = sum(t.numel() * 4 for t in [*net.parameters(), *net.buffers()] if t.is_floating_point())
    assert cache.nbytes == module_nbytes(net) > floats  # + the int64 BatchNorm counters


@pytest.mark.parametrize("device", cuda_devices())
def test_weights_load_straight_to_the_device_and_give_the_cpu_maps(device):
    from app.science.weights import load_model

    device = resolve_device(device)
    net, card = load_model(BASE, device=device)
    assert module_device(net).type == device.type
    assert all(t.device.type == device.type for t in net.state_dict().values())
    image = real_fields(1)[0][0]
    on_device = bb.predict_maps(net, image, diameter=card.diameter, tile=False)
    on_cpu = bb.predict_maps(base_model().net, image, diameter=card.diameter, tile=False)
    np.testing.assert_allclose(on_device.maps, on_cpu.maps, atol=1e-3)


@pytest.mark.parametrize("device", cuda_devices())
def test_masks_are_reconstructed_on_the_device(device):
    device = resolve_device(device)
    model = base_model()
    objects = 0
    for field in real_fields(3):
        maps = bb.predict_maps(model.net, field[0], diameter=model.diameter, tile=False)
        on_cpu = bb.masks_from_maps(maps, diameter=model.diameter, diam_mean=model.diam_mean)
        on_device = bb.masks_from_maps(maps, diameter=model.diameter, diam_mean=model.diam_mean, device=device)
        objects += int(on_cpu.max())
        assert match(on_cpu, on_device).f1 >= 0.99 or on_cpu.max() == on_device.max() == 0
    assert objects > 3


@pytest.mark.parametrize("device", cuda_devices())
def test_build_network_on_a_device(device):
    device = resolve_device(device)
    net = bb.build_network((8, 16, 32, 64), device=device)
    assert module_device(net).type == device.type and not net.training
    maps = bb.predict_maps_multi([net, net], np.random.default_rng(0).random((2, 40, 40)), diameter=30.0)
    assert maps[0].maps.shape == (3, 40, 40) and maps[0].maps.dtype == np.float32


@pytest.mark.gpu
def test_cuda_plate_in_reduced_precision_agrees_with_fp32():
    from app.science.plate import segment_fields
    from app.science.segmentation import ChannelModel
    from app.science.weights import load_model

    device = resolve_device("cuda")
    net, card = load_model(BASE, device=device)
    model = ChannelModel(net, card.diameter, card.diam_mean, "base")
    fields = [(i, f) for i, f in enumerate(real_fields(8))]
    fp32 = [o.result.labels for o in segment_fields(fields, [model, model], mask_device=device)]
    precision = default_precision(device, "training")  # bf16 or fp16, as the GPU supports
    low = [o.result.labels for o in segment_fields(fields, [model, model], mask_device=device, precision=precision)]
    f1 = [match(a, b).f1 for a, b in zip(fp32, low) if a.max()]
    assert f1 and np.mean(f1) >= 0.99, (precision, f1)
