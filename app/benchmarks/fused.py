"""Fused-segmentation benchmark: CellFuse's ``segment_field`` against the naive Cellpose route.

One K-channel field (a synthetic plate field; K = 4 by default, 512 x 512) is segmented with K
full-width CPnets (seeded random weights: the cost of a pass does not depend on the weights; the
cell-probability bias is shifted so that the random maps hold objects to compare) by

- **fused**: ``segment_field`` (normalise and resize every channel once, one untiled
  channels-last pass per channel under ``torch.inference_mode``, average the maps, one mask
  reconstruction);
- **naive**: K x ``CellposeModel.eval(compute_masks=False)`` with the same weights (loaded from a
  temporary file, Cellpose's default CPU settings), the maps averaged, then ONE
  ``dynamics.resize_and_compute_masks``.

Both routes use the same diameter, flow-error and cell-probability thresholds and number of
dynamics steps; model loading happens before the clock starts, and a small warm-up call compiles
Cellpose's numba kernels for both. With ``repeats > 1`` the routes alternate and the best time of
each counts. The agreement of the two routes' masks is reported (F1 at IoU 0.5 and Jaccard): the
untiled pass sees each object with its whole context instead of tapered 224-pixel tiles, so maps
differ slightly near tile seams. The last line printed is ``speed-up ratio: <naive / fused>``.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def benchmark_field(size: int, n_channels: int, seed: int = 0) -> tuple[np.ndarray, float]:
    """A (K, size, size) synthetic field and its median cell diameter (pixels)."""
    from app.science.synthetic import make_plate

    field = make_plate(1, size=size, seed=seed)[0]
    channels = [field.image[k % field.image.shape[0]] for k in range(n_channels)]
    diameter = float(field.extra.get("cell_diameter", 0.0)) or 30.0
    return np.stack(channels).astype(np.float32), diameter


def _calibrate_cellprob(net, channel: np.ndarray, diameter: float, foreground: float = 0.3) -> None:
    """Shift the cell-probability bias of a random net so ~``foreground`` of the pixels are cells.

    A randomly initialised CPnet predicts "no cell" everywhere, which would make the mask
    agreement between the routes vacuous; with the shift both routes reconstruct real (random)
    objects from the same maps. Timing is unaffected.
    """
    import torch

    from app.science import backbone

    crop = channel[: min(128, channel.shape[0]), : min(128, channel.shape[1])]
    maps = backbone.predict_maps(net, crop, diameter=diameter, tile=False)
    with torch.no_grad():
        net.output[-1].bias[2] -= float(np.quantile(maps.cellprob, 1.0 - foreground))


def run_fused_benchmark(
    size: int = 512,
    n_channels: int = 4,
    repeats: int = 1,
    tile: bool = False,
    echo: Callable[[str], None] = print,
    *,
    channels_last: bool | None = None,
    cellpose_mkldnn: bool = True,
) -> dict:
    """Time fused segmentation of one field against the naive route; print and return the numbers."""
    if size < 32 or n_channels < 1 or repeats < 1:
        raise ValueError(f"size must be >= 32, n_channels >= 1 and repeats >= 1; got {size}, {n_channels}, {repeats}")
    with tempfile.TemporaryDirectory(prefix="cellfuse-bench-") as tmp:
        # Read by Cellpose when cellpose.models is first imported: never its download cache here.
        os.environ.setdefault("CELLPOSE_LOCAL_MODELS_PATH", str(Path(tmp) / "cellpose-models"))
        return _run(size, n_channels, repeats, tile, echo, channels_last, cellpose_mkldnn, Path(tmp))


def _run(size, n_channels, repeats, tile, echo, channels_last, cellpose_mkldnn, tmp: Path) -> dict:
    import torch
    from cellpose import dynamics, models

    from app.science import backbone
    from app.science.flow_fusion import FUSED_FLOW_THRESHOLD
    from app.science.metrics import jaccard, match
    from app.science.segmentation import ChannelModel, segment_field

    image, diameter = benchmark_field(size, n_channels)
    echo(
        f"field: {n_channels} channels x {size} x {size} (synthetic), cell diameter {diameter:.1f} px, "
        f"torch threads {torch.get_num_threads()}, tile={tile}"
    )
    nets, cellpose_models = [], []
    for k in range(n_channels):
        torch.manual_seed(k)
        net = backbone.build_network(backbone.FULL_WIDTHS)
        _calibrate_cellprob(net, image[k], diameter)
        path = tmp / f"channel{k}.pth"
        torch.save(net.state_dict(), path)
        nets.append(net)
        cellpose_models.append(models.CellposeModel(pretrained_model=str(path), mkldnn=cellpose_mkldnn))
    diam_mean = backbone.DEFAULT_DIAM_MEAN
    channel_models = [ChannelModel(net, diameter, diam_mean, f"channel{k}") for k, net in enumerate(nets)]
    niter = backbone.default_niter(diameter, diam_mean)
    if channels_last is not None:
        backbone.FAST_PATH_CHANNELS_LAST = channels_last

    def fused_route():
        result = segment_field(image, channel_models, tile=tile)
        return result.labels, result.fused_maps, dict(result.timings)

    def naive_route():
        timings: dict[str, float] = {}
        started = time.perf_counter()
        flows, probs = [], []
        for k, model in enumerate(cellpose_models):
            tic = time.perf_counter()
            _, out, _ = model.eval(image[k], channels=[0, 0], diameter=diameter, compute_masks=False)
            timings[f"eval[{k}]"] = time.perf_counter() - tic
            flows.append(out[1])
            probs.append(out[2])
        tic = time.perf_counter()
        dp, cellprob = np.mean(flows, axis=0), np.mean(probs, axis=0)
        timings["average"] = time.perf_counter() - tic
        tic = time.perf_counter()
        labels = dynamics.resize_and_compute_masks(
            dp, cellprob, niter=niter, cellprob_threshold=0.0, flow_threshold=FUSED_FLOW_THRESHOLD,
            min_size=15, resize=None, device=torch.device("cpu"),
        )
        timings["masks"] = time.perf_counter() - tic
        timings["total"] = time.perf_counter() - started
        return np.asarray(labels, np.int32), np.concatenate([dp, cellprob[None]]), timings

    # Warm-up (untimed): numba compiles the dynamics kernels, torch allocates its first buffers.
    small = image[:, :64, :64]
    segment_field(small, channel_models, tile=tile)
    cellpose_models[0].eval(small[0], channels=[0, 0], diameter=diameter, compute_masks=True)

    best_fused = best_naive = None
    for _ in range(repeats):
        run = naive_route()
        if best_naive is None or run[2]["total"] < best_naive[2]["total"]:
            best_naive = run
        run = fused_route()
        if best_fused is None or run[2]["total"] < best_fused[2]["total"]:
            best_fused = run
    fused_labels, fused_maps, fused_t = best_fused
    naive_labels, naive_maps, naive_t = best_naive

    agreement = match(naive_labels, fused_labels)
    ratio = naive_t["total"] / fused_t["total"]
    result = {
        "size": size,
        "n_channels": n_channels,
        "repeats": repeats,
        "tile": tile,
        "diameter": diameter,
        "torch_threads": torch.get_num_threads(),
        "channels_last": backbone.FAST_PATH_CHANNELS_LAST,
        "cellpose_mkldnn": cellpose_mkldnn,
        "fused_seconds": fused_t["total"],
        "naive_seconds": naive_t["total"],
        "fused_stages": fused_t,
        "naive_stages": naive_t,
        "objects_fused": int(fused_labels.max()),
        "objects_naive": int(naive_labels.max()),
        "mask_f1_at_0.5": agreement.f1,
        "mask_mean_matched_iou": agreement.mean_matched_iou,
        "mask_jaccard": jaccard(naive_labels, fused_labels),
        "maps_max_abs_diff": float(np.abs(fused_maps - naive_maps).max()),
        "maps_mean_abs_diff": float(np.abs(fused_maps - naive_maps).mean()),
        "speedup": ratio,
    }
    echo("naive route (K x CellposeModel.eval(compute_masks=False), average, one reconstruction):")
    for stage, seconds in naive_t.items():
        echo(f"  {stage:>10}: {seconds:7.3f} s")
    echo("fused route (segment_field):")
    for stage, seconds in fused_t.items():
        echo(f"  {stage:>10}: {seconds:7.3f} s")
    echo(
        f"agreement naive vs fused: objects {result['objects_naive']} vs {result['objects_fused']}, "
        f"F1@0.5 {agreement.f1:.3f}, mean matched IoU {agreement.mean_matched_iou:.3f}, "
        f"Jaccard {result['mask_jaccard']:.3f}, maps |diff| mean {result['maps_mean_abs_diff']:.4f} "
        f"max {result['maps_max_abs_diff']:.3f}"
    )
    echo(f"naive: {naive_t['total']:.2f} s   fused: {fused_t['total']:.2f} s")
    echo(f"speed-up ratio: {ratio:.2f}")
    return result
