"""Precision benchmark: a reduced precision against fp32 on real fields, masks and time.

Real nuclei images (DSB2018 fluorescence, CC0; ``--data`` points at a folder of ``images/*.tif``)
are stacked four times into 4-channel fields and segmented with the shipped base in fp32 and in the
reduced precision (bf16 by default), the two alternating per
field so that machine load hits both alike. Printed: masks F1 at IoU 0.5 of reduced vs fp32 (mean
and min over fields with objects) and the ratio of network-and-normalisation time. The rule for a
default: F1 >= 0.99 and faster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path("/work/shared/data/dsb2018_fluo")
BASE = Path(__file__).resolve().parents[2] / "models_zoo" / "weights" / "cellfuse-base-w16-v3.safetensors"


def real_images(folder: Path, n: int) -> list[np.ndarray]:
    import tifffile

    images = []
    for path in sorted((folder / "images").glob("*.tif"))[:n]:
        image = np.asarray(tifffile.imread(path), np.float32)
        images.append(image if image.ndim == 2 else image[..., 0])
    if not images:
        raise FileNotFoundError(f"no images/*.tif under {folder}")
    return images


def run_precision_benchmark(
    n_images: int = 16,
    *,
    device: str = "cpu",
    precision: str = "bf16",
    data: Path = DEFAULT_DATA,
    echo: Callable[[str], None] = print,
) -> dict:
    from app.science.backbone import masks_from_maps, predict_maps_multi
    from app.science.device import (
        cuda_synchronized,
        device_name,
        resolve_device,
        resolve_precision,
    )
    from app.science.metrics import match
    from app.science.weights import load_model

    torch_device = resolve_device(device)
    low = resolve_precision(precision, torch_device)
    net, card = load_model(BASE, device=torch_device)
    images = real_images(Path(data), n_images)
    echo(
        f"precision benchmark: {len(images)} real fields x 4 channels, shipped base, {device_name(torch_device)}: "
        f"fp32 vs {low}"
    )
    seconds = {"fp32": 0.0, low: 0.0}
    f1 = []
    predict_maps_multi([net] * 4, np.stack([images[0][:64, :64]] * 4), diameter=card.diameter)  # warm-up
    for image in images:
        field = np.stack([image] * 4)
        labels = {}
        for run in ("fp32", low):
            started = time.perf_counter()
            with cuda_synchronized(torch_device):
                maps = predict_maps_multi([net] * 4, field, diameter=card.diameter, precision=run)
            seconds[run] += time.perf_counter() - started
            labels[run] = masks_from_maps(
                maps[0], diameter=card.diameter, diam_mean=card.diam_mean, device=torch_device
            )
        if labels["fp32"].max():
            f1.append(match(labels["fp32"], labels[low]).f1)
    result = {
        "precision": low,
        "device": str(torch_device),
        "n_fields": len(images),
        "f1_mean": round(float(np.mean(f1)), 4) if f1 else None,
        "f1_min": round(float(np.min(f1)), 4) if f1 else None,
        "fp32_s": round(seconds["fp32"], 2),
        f"{low}_s": round(seconds[low], 2),
        "speedup": round(seconds["fp32"] / max(seconds[low], 1e-9), 3),
    }
    echo(f"masks {low} vs fp32: F1@0.5 mean {result['f1_mean']}, min {result['f1_min']} over {len(f1)} fields")
    echo(f"network + normalisation: fp32 {seconds['fp32']:.1f} s, {low} {seconds[low]:.1f} s")
    echo(f"speed-up ratio ({low} over fp32): {result['speedup']:.2f}")
    return result
