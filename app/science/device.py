"""Where networks run (CPU or a CUDA device) and at what numerical precision.

A device is named by a *spec*: ``auto`` (the first CUDA device if there is one, else the CPU),
``cpu``, ``cuda`` (= ``cuda:0``) or ``cuda:N``. Resolving a spec may initialise CUDA, so a Celery
worker resolves it in each pool process after the fork, never in the prefork parent (a CUDA
context does not survive ``fork``: celery#3402).

Precision is ``fp32``, ``bf16`` or ``fp16``: the networks' convolutions run under
``torch.autocast`` in the lower precision, weights stay float32 and the maps come back float32.
``auto`` picks, per device and purpose, what was measured to agree with fp32 and to be faster:

* inference: ``fp32`` everywhere. bf16 is a measured option (``CELLFUSE_PRECISION=bf16``): with the
  shipped base on 8-16 DSB2018 fields x 4 channels it gave masks F1@0.5 0.999-1.000 against fp32
  (min 0.983) at 2.8-3.2x the speed on this CPU, but on a briefly trained full-width net
  (``cellfuse bench plate``) F1 0.77 (min 0.43): the agreement depends on the model, so it is not a
  default. ``cellfuse bench precision`` and ``scripts/gpu_check.sh`` measure it for a device.
* training: ``bf16`` on a CPU with native bf16 (oneDNN: AVX512-BF16 or AMX) and on CUDA GPUs that
  support it (``fp16`` with a gradient scaler on older ones), ``fp32`` elsewhere. Measured here: the
  best validation loss 2.3222 vs 2.3214 in fp32, a training step 1.8 -> 0.92 s of CPU.

Functions that reproduce Cellpose bit for bit (the tiled ``predict_maps``) default to ``fp32``;
the precision actually used is returned so that provenance can record it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch

#: What ``CELLFUSE_DEVICE`` accepts (checked without importing torch in ``app.settings``).
DEVICE_SPEC_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
#: What ``CELLFUSE_PRECISION`` accepts.
PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_SPECS = ("auto", *PRECISIONS)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceError(ValueError):
    """A device or precision that cannot be used on this machine."""


def parse_device_spec(spec: str) -> tuple[str, int | None]:
    """("auto" | "cpu" | "cuda", index or None) from a spec; touches no device.

    >>> parse_device_spec("cuda:1"), parse_device_spec(" CPU ")
    (('cuda', 1), ('cpu', None))
    """
    text = str(spec).strip().lower()
    if not re.match(DEVICE_SPEC_PATTERN, text):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if text.startswith("cuda"):
        return "cuda", int(text.split(":")[1]) if ":" in text else 0
    return text, None


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The torch device a spec names on this machine; a CUDA spec without that GPU is an error.

    Call it in the process that will compute (it initialises CUDA for a CUDA spec or ``auto``).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    kind, index = parse_device_spec(spec)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"CELLFUSE_DEVICE={spec} but no CUDA device is available here (torch {torch.__version__})")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise DeviceError(f"CELLFUSE_DEVICE={spec} but this machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def device_name(device: torch.device) -> str:
    """A readable name (the GPU's model for CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.backends.cpu.get_cpu_capability()})"


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively here (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_precision(device: torch.device, purpose: str = "inference") -> str:
    """The precision ``auto`` means on ``device`` for ``purpose`` ("inference" or "training"; see
    the module notes for the measurements)."""
    if purpose == "inference":
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def resolve_precision(spec: str, device: torch.device, purpose: str = "inference") -> str:
    """``fp32``/``bf16``/``fp16`` for a spec (``auto`` -> ``default_precision``)."""
    text = str(spec).strip().lower()
    if text not in PRECISION_SPECS:
        raise DeviceError(f"precision must be one of {', '.join(PRECISION_SPECS)}, got {spec!r}")
    return default_precision(device, purpose) if text == "auto" else text


def autocast(device: torch.device | str, precision: str):
    """A context running eligible ops (convolutions, matmuls) in ``precision``; fp32 is a no-op."""
    if precision == "fp32":
        return nullcontext()
    if precision not in _DTYPES:
        raise DeviceError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=_DTYPES[precision])


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a network's parameters live on."""
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def module_nbytes(module: torch.nn.Module) -> int:
    """Bytes held by a network's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


@contextmanager
def cuda_synchronized(device: torch.device) -> Iterator[None]:
    """Wait for queued CUDA work at exit (for honest timings); nothing on the CPU."""
    try:
        yield
    finally:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
