"""Segment a field larger than a memory budget in overlapping blocks, without seams.

The problem (the same one Cellpose's ``distributed_eval`` meets, and its reported seam issues): a
block sees only part of the field, so (a) per-block intensity normalisation differs from block to
block, (b) the network's maps near a block's edge differ from the whole-field maps (missing context,
and a style vector per block), and (c) an object crossing a block border is cut in two, or found twice.

What this module does about each:

* (a) Normalisation is fixed once per channel for the whole field (percentiles of a strided sample
  of the field, or values the caller gives), then applied to every block: no block is brighter or
  dimmer than its neighbour.
* (b) Every block is read with a halo of ``overlap`` pixels (default 2 object diameters) on each
  side; only the block's core is kept, so every kept map value had at least ``overlap`` pixels of
  context, as in the whole-field pass. And every block is decoded with the *field's* style vector
  (CPnet broadcasts a global style into its decoder; see ``field_styles``), estimated in a first,
  encoder-only pass over the blocks: per-block styles were the larger source of map differences.
* (c) Two ways to make masks, chosen by the memory budget:

  - ``"maps"`` (preferred): the cores' fused maps are stitched into one field-sized map
    (12 bytes per pixel) and Cellpose's mask reconstruction runs ONCE over it. Nothing is cut, since
    the dynamics never see a block border; this reproduces the whole-field route up to the small
    map differences of (b). Used whenever the stitched maps and one reconstruction fit the budget.
  - ``"labels"``: for fields whose maps alone exceed the budget (a stitched 10,000² well is 1.2 GB of
    maps), masks are reconstructed per block over core + halo, and objects are stitched by ownership:
    a block contributes the objects that touch its core and not its outer edge (with
    overlap >= 1 diameter such an object lies wholly inside the block); blocks are visited in raster
    order and an object that mostly overlaps an object already placed (IoU >= 0.5, the same object
    seen from the neighbour block) is dropped, so an object is never doubled, and never lost because
    the cores tile the field. Distributed_eval instead merges labels across overlaps by a graph of
    touching labels, which can fuse neighbouring cells into one; ownership cannot.

Inputs can be any array-like that slices (a numpy array, a zarr array of a stitched well), and the
output can be one too, so a field larger than memory streams through block by block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

from app.science.backbone import Normalization, _pad_for_net, diam_mean_of, masks_from_maps, predict_maps_multi
from app.science.flow_fusion import FUSED_FLOW_THRESHOLD, fuse_maps
from app.science.segmentation import ChannelModel, SegmentationInputError, reconstruction_size

#: Bytes per pixel that Cellpose's mask reconstruction needs over the maps themselves (flows,
#: pixel positions during the dynamics, histograms). Measured here as peak-RSS growth of
#: ``masks_from_maps`` on tiled real maps: 29 B/px at 2048², 27 B/px at 3072² (above the peak the
#: network pass had left); 64 leaves room for what that measurement could not see.
RECONSTRUCTION_BYTES_PER_PIXEL = 64
#: Bytes per pixel of a block pass per channel: the field block, the normalised copy, the maps,
#: and the network's activations (a CPnet at full width holds ~ 200 floats per pixel at once).
BLOCK_BYTES_PER_PIXEL_PER_CHANNEL = 1000
#: Pixels sampled per channel for the field-wide percentiles.
NORMALIZATION_SAMPLE = 4_000_000


@dataclass(frozen=True)
class BlockPlan:
    """Cores tile the field; each is read with up to ``overlap`` pixels of halo on every side."""

    shape: tuple[int, int]
    block_size: int
    overlap: int
    cores: list[tuple[slice, slice]]
    reads: list[tuple[slice, slice]]


@dataclass
class BlockedResult:
    labels: np.ndarray | object
    mode: str  # "maps" | "labels" | "whole"
    plan: BlockPlan | None
    normalizations: list[Normalization]
    stats: dict = field(default_factory=dict)
    styles: list[np.ndarray] = field(default_factory=list)


def plan_blocks(shape: tuple[int, int], block_size: int, overlap: int) -> BlockPlan:
    if block_size < 32:
        raise SegmentationInputError(f"block_size must be at least 32 pixels, got {block_size}")
    if overlap < 0:
        raise SegmentationInputError(f"overlap must be >= 0, got {overlap}")
    ly, lx = shape
    cores, reads = [], []
    for y0 in range(0, ly, block_size):
        for x0 in range(0, lx, block_size):
            y1, x1 = min(ly, y0 + block_size), min(lx, x0 + block_size)
            cores.append((slice(y0, y1), slice(x0, x1)))
            reads.append(
                (slice(max(0, y0 - overlap), min(ly, y1 + overlap)), slice(max(0, x0 - overlap), min(lx, x1 + overlap)))
            )
    return BlockPlan((ly, lx), block_size, overlap, cores, reads)


def default_overlap(channel_models: Sequence[ChannelModel]) -> int:
    """Two object diameters: one for the network's context, one so an object touching a core fits."""
    return int(math.ceil(2 * max(m.diameter for m in channel_models)))


def field_normalizations(
    image, lower: float = 1.0, upper: float = 99.0, sample: int = NORMALIZATION_SAMPLE
) -> list[Normalization]:
    """Fixed per-channel percentiles for the whole field, from a strided sample when it is large."""
    k, ly, lx = image.shape
    step = max(1, int(math.ceil(math.sqrt(ly * lx / sample))))
    out = []
    for c in range(k):
        values = np.asarray(image[c, ::step, ::step], dtype=np.float32)
        low, high = np.percentile(values, [lower, upper])
        if not high > low:
            high = low + 1.0  # a flat channel: any scale, the net sees zeros either way
        out.append(Normalization(low=float(low), high=float(high)))
    return out


def choose_mode(shape: tuple[int, int], memory_budget_bytes: int) -> str:
    """'maps' when the stitched fused maps and one reconstruction fit the budget, else 'labels'."""
    pixels = shape[0] * shape[1]
    return "maps" if pixels * (12 + RECONSTRUCTION_BYTES_PER_PIXEL) <= memory_budget_bytes else "labels"


def block_size_for_budget(
    n_channels: int, overlap: int, memory_budget_bytes: int, *, minimum: int = 64, maximum: int = 4096
) -> int:
    """The largest core whose block (core + 2 halos) pass fits the budget."""
    side = math.sqrt(memory_budget_bytes / (BLOCK_BYTES_PER_PIXEL_PER_CHANNEL * max(1, n_channels)))
    return int(max(minimum, min(maximum, (int(side) - 2 * overlap) // 16 * 16)))


class _StyleProbe(Exception):
    """Raised by ``_PoolFeatures`` to stop a forward pass once the encoder's pooled features are known."""

    def __init__(self, total: torch.Tensor, count: int):
        super().__init__("style probe")
        self.total = total
        self.count = count


class _PoolFeatures(torch.nn.Module):
    """Stands in for CPnet's ``make_style`` in pass 1: the sum of the deepest features over the
    block's core (``crop``: fractions of the padded input), then stops the pass."""

    def __init__(self, crop: tuple[float, float, float, float]):
        super().__init__()
        self.crop = crop

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        h, w = x0.shape[-2:]
        y0, y1, x0_, x1 = self.crop
        ys = slice(round(y0 * h), max(round(y0 * h) + 1, round(y1 * h)))
        xs = slice(round(x0_ * w), max(round(x0_ * w) + 1, round(x1 * w)))
        region = x0[..., ys, xs].float()
        raise _StyleProbe(region.sum(dim=(-2, -1)), region.shape[-2] * region.shape[-1])


class _FixedStyle(torch.nn.Module):
    """Stands in for ``make_style`` in pass 2: every block gets the field's style."""

    def __init__(self, style: torch.Tensor):
        super().__init__()
        self.style = style

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        return self.style.to(x0.device, x0.dtype).expand(x0.shape[0], -1)


@contextmanager
def _style_module(net: torch.nn.Module, module: torch.nn.Module):
    original = net.make_style
    net.make_style = module
    try:
        yield
    finally:
        net.make_style = original


def field_styles(
    image,
    channel_models: Sequence[ChannelModel],
    normalizations: Sequence[Normalization],
    plan: BlockPlan,
    *,
    max_blocks: int = 64,
) -> list[np.ndarray]:
    """The style vector each channel's net would compute over the whole field.

    CPnet's style is the normalised global mean of its deepest features, broadcast into the decoder:
    a block alone gets its own style and so different maps everywhere (measured here: 5x the mean
    map difference to the whole-field pass). The field's mean is the sum of the deepest features
    over the blocks' cores (which tile the field once) over their count; at most ``max_blocks``
    evenly spread blocks are probed, encoder only.
    """
    picks = np.unique(np.linspace(0, len(plan.reads) - 1, min(max_blocks, len(plan.reads))).astype(int))
    styles = []
    for k, model in enumerate(channel_models):
        total, count = None, 0
        rescale = diam_mean_of(model.net) / model.diameter
        for i in picks:
            read, core = plan.reads[i], plan.cores[i]
            block = np.asarray(image[k : k + 1, read[0], read[1]], dtype=np.float32)
            crop = _core_fractions(core, read, rescale)
            try:
                with _style_module(model.net, _PoolFeatures(crop)):
                    predict_maps_multi(
                        [model.net], block, diameter=[model.diameter], normalizations=[normalizations[k]], tile=False
                    )
            except _StyleProbe as probe:
                block_total, block_count = probe.total[0].double(), probe.count
            else:  # pragma: no cover - the probe always fires
                raise RuntimeError("the style probe did not run")
            total = block_total if total is None else total + block_total
            count += block_count
        mean = total / count  # type: ignore[operator]
        styles.append((mean / mean.norm()).float().numpy())  # type: ignore[union-attr]
    return styles


def _core_fractions(
    core: tuple[slice, slice], read: tuple[slice, slice], rescale: float
) -> tuple[float, float, float, float]:
    """Where a block's core lies in the padded, rescaled network input, as fractions of its size."""
    hb, wb = read[0].stop - read[0].start, read[1].stop - read[1].start
    hr, wr = int(hb * rescale), int(wb * rescale)  # Cellpose's rounding in resize_image
    padded, (ypad1, _ypad2, xpad1, _xpad2) = _pad_for_net(np.zeros((hr, wr), np.float32))
    hp, wp = padded.shape[-2:]
    inner = _core_in_block(core, read)
    return (
        (ypad1 + inner[0].start * hr / hb) / hp,
        (ypad1 + inner[0].stop * hr / hb) / hp,
        (xpad1 + inner[1].start * wr / wb) / wp,
        (xpad1 + inner[1].stop * wr / wb) / wp,
    )


def _block_maps(
    image,
    read: tuple[slice, slice],
    channel_models: Sequence[ChannelModel],
    normalizations: Sequence[Normalization],
    styles: Sequence[np.ndarray],
    weights,
    tile: bool,
) -> np.ndarray:
    block = np.asarray(image[:, read[0], read[1]], dtype=np.float32)
    maps = []
    for k, model in enumerate(channel_models):
        with _style_module(model.net, _FixedStyle(torch.from_numpy(styles[k])[None])):
            maps.extend(
                predict_maps_multi(
                    [model.net],
                    block[k : k + 1],
                    diameter=[model.diameter],
                    normalizations=[normalizations[k]],
                    tile=tile,
                )
            )
    return fuse_maps(maps, weights)


def _core_in_block(core: tuple[slice, slice], read: tuple[slice, slice]) -> tuple[slice, slice]:
    return (
        slice(core[0].start - read[0].start, core[0].stop - read[0].start),
        slice(core[1].start - read[1].start, core[1].stop - read[1].start),
    )


def _outer_edge_mask(read: tuple[slice, slice], shape: tuple[int, int]) -> np.ndarray:
    """Pixels on a block's border that is not the field's border (objects touching it are cut)."""
    h, w = read[0].stop - read[0].start, read[1].stop - read[1].start
    edge = np.zeros((h, w), bool)
    if read[0].start > 0:
        edge[0, :] = True
    if read[0].stop < shape[0]:
        edge[-1, :] = True
    if read[1].start > 0:
        edge[:, 0] = True
    if read[1].stop < shape[1]:
        edge[:, -1] = True
    return edge


def segment_blocked(
    image,
    channel_models: Sequence[ChannelModel],
    *,
    block_size: int | None = None,
    overlap: int | None = None,
    memory_budget_bytes: int = 2 << 30,
    mode: str | None = None,
    normalizations: Sequence[Normalization] | None = None,
    weights: Sequence[float] | None = None,
    flow_threshold: float | None = None,
    cellprob_threshold: float = 0.0,
    min_size: int = 15,
    tile: bool = False,
    out=None,
) -> BlockedResult:
    """Flow Fusion labels of a (K, Y, X) field segmented block by block (see the module notes).

    ``block_size``: core side in pixels (default: the largest that fits ``memory_budget_bytes``);
    ``overlap``: halo in pixels (default 2 object diameters); ``mode``: "maps", "labels" or None
    (chosen by the budget). ``out``: an optional (Y, X) int32 array-like to write labels into.
    """
    if image.ndim != 3:
        raise SegmentationInputError(f"a field must be (channels, Y, X), got shape {image.shape}")
    models = list(channel_models)
    k, ly, lx = image.shape
    if len(models) != k:
        raise SegmentationInputError(f"the field has {k} channels but {len(models)} channel models were given")
    overlap = default_overlap(models) if overlap is None else int(overlap)
    block_size = block_size or block_size_for_budget(k, overlap, memory_budget_bytes)
    mode = mode or choose_mode((ly, lx), memory_budget_bytes)
    if mode not in ("maps", "labels"):
        raise SegmentationInputError(f"mode must be 'maps' or 'labels', got {mode!r}")
    norms = list(normalizations) if normalizations is not None else field_normalizations(image)
    plan = plan_blocks((ly, lx), block_size, overlap)
    diameter, diam_mean = reconstruction_size(models)
    threshold = FUSED_FLOW_THRESHOLD if flow_threshold is None else flow_threshold
    mask_args = dict(
        diameter=diameter,
        diam_mean=diam_mean,
        flow_threshold=threshold,
        cellprob_threshold=cellprob_threshold,
        min_size=min_size,
    )
    stats = {"blocks": len(plan.cores), "block_size": block_size, "overlap": overlap}
    styles = field_styles(image, models, norms, plan)

    if mode == "maps":
        fused = np.zeros((3, ly, lx), np.float32)
        for core, read in zip(plan.cores, plan.reads):
            maps = _block_maps(image, read, models, norms, styles, weights, tile)
            inner = _core_in_block(core, read)
            fused[:, core[0], core[1]] = maps[:, inner[0], inner[1]]
        labels = masks_from_maps(fused, **mask_args)  # type: ignore[arg-type]
        del fused
        if out is not None:
            out[...] = labels
            labels = out
        return BlockedResult(labels, "maps", plan, norms, stats, styles)

    labels = out if out is not None else np.zeros((ly, lx), np.int32)
    next_label = 1
    dropped_duplicates = 0
    for core, read in zip(plan.cores, plan.reads):
        maps = _block_maps(image, read, models, norms, styles, weights, tile)
        block_labels = masks_from_maps(maps, **mask_args)  # type: ignore[arg-type]
        del maps
        inner = _core_in_block(core, read)
        in_core = np.zeros(block_labels.shape, bool)
        in_core[inner] = True
        touching_core = set(np.unique(block_labels[in_core]).tolist()) - {0}
        cut = set(np.unique(block_labels[_outer_edge_mask(read, (ly, lx))]).tolist())
        placed = np.asarray(labels[read[0], read[1]])
        updated = placed.copy()
        objects = ndimage.find_objects(block_labels)
        for lab in sorted(touching_core - cut):
            box = objects[lab - 1]
            mine = block_labels[box] == lab
            there = placed[box][mine]
            taken = np.count_nonzero(there)
            if taken:
                # The same object seen from a neighbour block: drop it if it mostly overlaps one.
                ids, counts = np.unique(there[there > 0], return_counts=True)
                best, inter = ids[np.argmax(counts)], int(counts.max())
                area_best = int(np.count_nonzero(placed == best))
                if inter / (int(mine.sum()) + area_best - inter) >= 0.5:
                    dropped_duplicates += 1
                    continue
            free = mine & (updated[box] == 0)
            if np.count_nonzero(free) < min_size:
                continue
            view = updated[box]
            view[free] = next_label
            next_label += 1
        labels[read[0], read[1]] = updated
    stats["dropped_duplicates"] = dropped_duplicates
    return BlockedResult(labels, "labels", plan, norms, stats, styles)
