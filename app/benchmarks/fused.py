"""Fused-segmentation benchmark: CellFuse's ``segment_field`` against the naive Cellpose route.

One K-channel field (a synthetic plate field; K = 4 by default, 512 x 512) is segmented with K
full-width CPnets (the cost of a pass does not depend on the weights; by default one net is first
trained for 25 steps on the field so that the routes' masks hold real objects to compare) by

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


def benchmark_field(size: int, n_channels: int, seed: int = 0) -> tuple[np.ndarray, float, np.ndarray]:
    """A (K, size, size) synthetic field, its median cell diameter (pixels) and its cell labels."""
    from app.science.synthetic import make_plate

    field = make_plate(1, size=size, seed=seed)[0]
    channels = [field.image[k % field.image.shape[0]] for k in range(n_channels)]
    diameter = float(field.extra.get("cell_diameter", 0.0)) or 30.0
    return np.stack(channels).astype(np.float32), diameter, field.cells


def quick_trained_state(
    image: np.ndarray, labels: np.ndarray, diameter: float, steps: int, seed: int = 0, crop: int = 64
) -> dict:
    """State dict of a full-width CPnet trained ``steps`` steps (Cellpose's loss) on crops of one field.

    Only so that the two routes' masks can be compared on real objects: a randomly initialised
    CPnet predicts "no cell" everywhere, which makes mask agreement vacuous. Timing does not
    depend on the weights.
    """
    import cv2
    import torch
    from cellpose import dynamics, transforms

    from app.science import backbone
    from app.science.training import segmentation_loss

    scale = backbone.DEFAULT_DIAM_MEAN / diameter  # train at the size the net sees objects
    ly, lx = int(image.shape[0] * scale), int(image.shape[1] * scale)
    small = cv2.resize(transforms.normalize99(image.astype(np.float32)), (lx, ly), interpolation=cv2.INTER_LINEAR)
    small_labels = cv2.resize(labels.astype(np.float32), (lx, ly), interpolation=cv2.INTER_NEAREST).astype(np.int32)
    crop = min(crop, ly, lx) // 16 * 16
    rng = np.random.default_rng(seed)
    starts = [(int(rng.integers(0, ly - crop + 1)), int(rng.integers(0, lx - crop + 1))) for _ in range(3)]
    x = np.stack([np.stack([small[y : y + crop, c : c + crop], np.zeros((crop, crop), np.float32)]) for y, c in starts])
    targets = []
    for y, c in starts:
        lab = small_labels[y : y + crop, c : c + crop]
        targets.append(np.concatenate([(lab > 0)[None], dynamics.masks_to_flows(lab)]).astype(np.float32))
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(np.stack(targets))
    torch.manual_seed(seed)
    net = backbone.build_network(backbone.FULL_WIDTHS)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.3  # running statistics must settle within a few dozen steps
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.005, weight_decay=1e-5)
    net.train()
    for _ in range(steps):
        loss = segmentation_loss(net(x_t)[0], y_t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = 0.05
    return {name: tensor.detach().clone() for name, tensor in net.state_dict().items()}


def run_fused_benchmark(
    size: int = 512,
    n_channels: int = 4,
    repeats: int = 1,
    tile: bool = False,
    echo: Callable[[str], None] = print,
    *,
    channels_last: bool | None = None,
    cellpose_mkldnn: bool = True,
    train_steps: int = 25,
) -> dict:
    """Time fused segmentation of one field against the naive route; print and return the numbers.

    ``train_steps`` > 0 first trains one net briefly on the field (copied to every channel, untimed)
    so that the masks compared are real objects; 0 keeps all K nets at their seeded random init.
    """
    if size < 32 or n_channels < 1 or repeats < 1:
        raise ValueError(f"size must be >= 32, n_channels >= 1 and repeats >= 1; got {size}, {n_channels}, {repeats}")
    from app.science import backbone

    layout = backbone.FAST_PATH_CHANNELS_LAST
    with tempfile.TemporaryDirectory(prefix="cellfuse-bench-") as tmp:
        # Read by Cellpose when cellpose.models is first imported: never its download cache here.
        os.environ.setdefault("CELLPOSE_LOCAL_MODELS_PATH", str(Path(tmp) / "cellpose-models"))
        try:
            return _run(size, n_channels, repeats, tile, echo, channels_last, cellpose_mkldnn, train_steps, Path(tmp))
        finally:
            backbone.FAST_PATH_CHANNELS_LAST = layout  # the layout switch is for this run only


def _run(size, n_channels, repeats, tile, echo, channels_last, cellpose_mkldnn, train_steps, tmp: Path) -> dict:
    import torch
    from cellpose import dynamics, models

    from app.science import backbone
    from app.science.flow_fusion import FUSED_FLOW_THRESHOLD
    from app.science.metrics import jaccard, match
    from app.science.segmentation import ChannelModel, segment_field

    image, diameter, truth = benchmark_field(size, n_channels)
    echo(
        f"field: {n_channels} channels x {size} x {size} (synthetic), cell diameter {diameter:.1f} px, "
        f"torch threads {torch.get_num_threads()}, tile={tile}"
    )
    trained = None
    if train_steps > 0:
        tic = time.perf_counter()
        trained = quick_trained_state(image[0], truth, diameter, train_steps)
        echo(
            f"set-up (untimed): one net trained {train_steps} steps on crops of channel 0 in {time.perf_counter() - tic:.1f} s"
        )
    nets, cellpose_models = [], []
    for k in range(n_channels):
        torch.manual_seed(k)
        net = backbone.build_network(backbone.FULL_WIDTHS)
        if trained is not None:
            net.load_state_dict(trained)
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
            dp,
            cellprob,
            niter=niter,
            cellprob_threshold=0.0,
            flow_threshold=FUSED_FLOW_THRESHOLD,
            min_size=15,
            resize=None,
            device=torch.device("cpu"),
        )
        timings["masks"] = time.perf_counter() - tic
        timings["total"] = time.perf_counter() - started
        return np.asarray(labels, np.int32), np.concatenate([dp, cellprob[None]]), timings

    # Warm-up (untimed): numba compiles the dynamics kernels, torch allocates its first buffers.
    small = image[:, :64, :64]
    segment_field(small, channel_models, tile=tile)
    cellpose_models[0].eval(small[0], channels=[0, 0], diameter=diameter, compute_masks=True)

    best_fused: tuple[np.ndarray, np.ndarray, dict[str, float]] | None = None
    best_naive: tuple[np.ndarray, np.ndarray, dict[str, float]] | None = None
    for _ in range(repeats):
        run = naive_route()
        if best_naive is None or run[2]["total"] < best_naive[2]["total"]:
            best_naive = run
        run = fused_route()
        if best_fused is None or run[2]["total"] < best_fused[2]["total"]:
            best_fused = run
    assert best_fused is not None and best_naive is not None  # repeats >= 1
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
        "objects_true": int(truth.max()),
        "fused_f1_vs_truth": match(truth, fused_labels).f1,
        "naive_f1_vs_truth": match(truth, naive_labels).f1,
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
    echo(
        f"against the {result['objects_true']} true cells: F1@0.5 naive {result['naive_f1_vs_truth']:.3f}, "
        f"fused {result['fused_f1_vs_truth']:.3f}"
    )
    echo(f"naive: {naive_t['total']:.2f} s   fused: {fused_t['total']:.2f} s")
    echo(f"speed-up ratio: {ratio:.2f}")
    return result
