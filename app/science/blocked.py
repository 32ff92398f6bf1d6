"""Segment a field larger than a memory budget in overlapping blocks, without seams.

The problem (the same one Cellpose's ``distributed_eval`` meets, and its reported seam issues): a
block sees only part of the field, so (a) per-block intensity normalisation differs from block to
block, (b) the network's maps near a block's edge differ from the whole-field maps, and (c) an
object crossing a block border is cut in two, or found twice.

What this module does about each:

* (a) Normalisation is fixed once per channel for the whole field (percentiles of a strided sample
  of the field, or values the caller gives), then applied to every block: no block is brighter or
  dimmer than its neighbour.
* (b) A block is a window of the *whole field's* network input, not a small field of its own.
  Cellpose resizes the field by diam_mean / diameter and zero-pads it to a multiple of 16; a block
  resized and padded on its own samples the field on a slightly shifted grid and meets the net's
  16-pixel pooling grid at another phase, so its maps differ everywhere, not only at its edges
  (measured: more context did not help, F1 0.986 at any halo). Here each block computes exactly
  the resized pixels of the field's grid it needs (OpenCV's linear interpolation, reproduced with
  the field's scale), places them at the field's padding offset, and reads a window aligned to
  16 on the padded field, with ``overlap`` pixels of context (in field pixels, scaled to the net)
  around the part it keeps; its maps are resized back with the field's scale too. Every block is
  decoded with the *field's* style vector (CPnet broadcasts a global style into its decoder; see
  ``field_styles``), summed exactly over a partition of the padded field in a first, encoder-only
  pass. With 2 diameters of context the stitched maps differ from the whole-field maps by ~1e-4
  on average (cell probability, shipped base; the labels were identical on the fields measured).
* (c) Two ways to make masks, chosen by the memory budget:

  - ``"maps"`` (preferred): the cores' fused maps are stitched into one field-sized map
    (12 bytes per pixel) and Cellpose's mask reconstruction runs ONCE over it. Nothing is cut, since
    the dynamics never see a block border. Used whenever the stitched maps and one reconstruction
    fit the budget.
  - ``"labels"``: for fields whose maps alone exceed the budget (a stitched 10,000² well is 1.2 GB of
    maps), masks are reconstructed per block over core + ``overlap`` (maps with half an overlap
    more context), and each object is kept by exactly one block, decided from the object alone:
    the block whose core holds its centroid, if the object lies clear of that block's outer edge
    (true whenever the object is smaller than the overlap), else the block holding it clear whose
    core centre is nearest. Two blocks that see the same object decide the same, so an object is
    neither doubled nor lost; an object that came out slightly differently in two blocks and
    mostly overlaps one already placed (IoU >= 0.5) is dropped all the same. Distributed_eval
    instead merges labels across overlaps by a graph of touching labels, which can fuse
    neighbouring cells into one; ownership cannot.

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
from cellpose import transforms
from scipy import ndimage

from app.science.backbone import (
    FAST_PATH_CHANNELS_LAST,
    Normalization,
    _forward,
    _rescale_factor,
    masks_from_maps,
    min_size_for,
)
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
#: Cellpose pads the resized field to a multiple of this (``get_pad_yx``); the net pools by
#: factors of 2 down to it, so windows of the padded field aligned to it see the same pooling grid.
NET_GRID = 16


@dataclass(frozen=True)
class BlockPlan:
    """Cores tile the field; each is read with up to ``overlap`` pixels of halo on every side."""

    shape: tuple[int, int]
    block_size: int
    overlap: int
    cores: list[tuple[slice, slice]]
    reads: list[tuple[slice, slice]]

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of blocks; cores are listed row by row."""
        return math.ceil(self.shape[0] / self.block_size), math.ceil(self.shape[1] / self.block_size)


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
    """Two object diameters: the context after which a block's maps match the field's (measured:
    mean cell-probability difference ~1e-4 at 2 diameters, ~1e-2 at 1), and room for an object
    touching a core."""
    return int(math.ceil(2 * max(m.diameter for m in channel_models)))


def field_normalizations(
    image, lower: float = 1.0, upper: float = 99.0, sample: int = NORMALIZATION_SAMPLE
) -> list[Normalization]:
    """Fixed per-channel percentiles for the whole field, from a strided sample when it is large."""
    return [_field_normalization(image, c, lower, upper, sample) for c in range(image.shape[0])]


def _field_normalization(image, c: int, lower: float, upper: float, sample: int = NORMALIZATION_SAMPLE):
    _k, ly, lx = image.shape
    step = max(1, int(math.ceil(math.sqrt(ly * lx / sample))))
    values = np.asarray(image[c, ::step, ::step], dtype=np.float32)
    low, high = np.percentile(values, [lower, upper])
    if not high > low:
        high = low + 1.0  # a flat channel: any scale, the net sees zeros either way
    return Normalization(low=float(low), high=float(high))


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


def _linear_taps(src: int, dst: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR along one axis resized from ``src`` to ``dst`` pixels, for output pixels
    [start, stop): the two source pixels and the weight of the second (half-pixel centres, clamped
    at the ends as OpenCV clamps). Matches ``cv2.resize`` on float32 to ~1e-7."""
    pos = (np.arange(start, stop, dtype=np.float64) + 0.5) * (src / dst) - 0.5
    lo = np.floor(pos).astype(np.int64)
    weight = pos - lo
    before = lo < 0
    lo[before], weight[before] = 0, 0.0
    after = lo >= src - 1
    lo[after], weight[after] = src - 1, 0.0
    return lo, np.minimum(lo + 1, src - 1), weight.astype(np.float32)


def _resample(array: np.ndarray, axis: int, src: int, dst: int, out: tuple[int, int], first: int) -> np.ndarray:
    """Output pixels ``out`` of the whole axis resized from ``src`` to ``dst``, from ``array`` that
    holds that axis's pixels [first, first + array.shape[axis])."""
    lo, hi, weight = _linear_taps(src, dst, *out)
    shape = [1] * array.ndim
    shape[axis] = -1
    weight = weight.reshape(shape)
    below = np.take(array, lo - first, axis=axis)
    above = np.take(array, hi - first, axis=axis)
    return below * (np.float32(1) - weight) + above * weight


@dataclass(frozen=True)
class _NetGrid:
    """Where one channel's net sees the whole field: resized to int(L * rescale) pixels (Cellpose's
    rounding) and zero-padded by ``get_pad_yx``. Blocks are windows of this padded field."""

    shape: tuple[int, int]
    resized: tuple[int, int]
    pads: tuple[int, int, int, int]  # ypad1, ypad2, xpad1, xpad2
    rescale: float

    @classmethod
    def of(cls, shape: tuple[int, int], rescale: float) -> _NetGrid:
        ly, lx = shape
        hr, wr = (int(ly * rescale), int(lx * rescale)) if rescale != 1.0 else (ly, lx)
        ypad1, ypad2, xpad1, xpad2 = transforms.get_pad_yx(hr, wr)
        return cls((ly, lx), (hr, wr), (int(ypad1), int(ypad2), int(xpad1), int(xpad2)), rescale)

    @property
    def padded(self) -> tuple[int, int]:
        return self.resized[0] + self.pads[0] + self.pads[1], self.resized[1] + self.pads[2] + self.pads[3]

    def boundary(self, axis: int, position: int) -> int:
        """A field coordinate on the padded grid, rounded to the pooling grid (0 and the far edge
        map to the padded field's edges, so the boundaries of a tiling partition it)."""
        if position <= 0:
            return 0
        if position >= self.shape[axis]:
            return self.padded[axis]
        scaled = self.pads[2 * axis] + position * self.resized[axis] / self.shape[axis]
        return int(round(scaled / NET_GRID)) * NET_GRID

    def window(self, axis: int, out: tuple[int, int], context: int, must: tuple[int, int]) -> tuple[int, int]:
        """The aligned window of the padded field whose maps give field pixels ``out`` along
        ``axis`` with ``context`` net pixels around them, covering padded range ``must`` too."""
        if self.resized[axis] == self.shape[axis]:
            lo, hi = out[0], out[1]
        else:
            taps_lo, taps_hi, _ = _linear_taps(self.resized[axis], self.shape[axis], *out)
            lo, hi = int(taps_lo.min()), int(taps_hi.max()) + 1
        pad = self.pads[2 * axis]
        start = min(must[0], (pad + lo - context) // NET_GRID * NET_GRID)
        stop = max(must[1], -(-(pad + hi + context) // NET_GRID) * NET_GRID)
        return max(0, start), min(self.padded[axis], stop)

    def net_input(self, image, k: int, norm: Normalization, win: tuple[tuple[int, int], tuple[int, int]]):
        """(1, 2, h, w) net input of channel ``k`` for a padded-field window, and where the resized
        field lies in it. Reads only the field pixels the window needs (``image`` may be lazy)."""
        inside = []
        for axis in (0, 1):
            pad = self.pads[2 * axis]
            inside.append((max(0, win[axis][0] - pad), min(self.resized[axis], win[axis][1] - pad)))
        batch = np.zeros((1, 2, win[0][1] - win[0][0], win[1][1] - win[1][0]), np.float32)
        if inside[0][1] > inside[0][0] and inside[1][1] > inside[1][0]:
            region = []
            for axis in (0, 1):
                if self.resized[axis] == self.shape[axis]:
                    region.append(inside[axis])
                else:
                    lo, hi, _ = _linear_taps(self.shape[axis], self.resized[axis], *inside[axis])
                    region.append((int(lo.min()), int(hi.max()) + 1))
            source = np.array(image[k, region[0][0] : region[0][1], region[1][0] : region[1][1]], np.float32)
            # Fixed low/high: the same pointwise scaling as Cellpose's normalize_img with lowhigh.
            source -= np.float32(norm.low)
            source /= np.float32(norm.high - norm.low)  # type: ignore[operator]
            for axis in (0, 1):
                if self.resized[axis] != self.shape[axis]:
                    source = _resample(
                        source, axis, self.shape[axis], self.resized[axis], inside[axis], region[axis][0]
                    )
            y0 = self.pads[0] + inside[0][0] - win[0][0]
            x0 = self.pads[2] + inside[1][0] - win[1][0]
            batch[0, 0, y0 : y0 + source.shape[0], x0 : x0 + source.shape[1]] = source
        return batch, inside

    def field_maps(self, maps: np.ndarray, win, inside, out: tuple[tuple[int, int], tuple[int, int]]) -> np.ndarray:
        """The (3, ...) maps of field pixels ``out`` from a window's net output, resized back."""
        y0 = self.pads[0] + inside[0][0] - win[0][0]
        x0 = self.pads[2] + inside[1][0] - win[1][0]
        maps = maps[:, y0 : y0 + inside[0][1] - inside[0][0], x0 : x0 + inside[1][1] - inside[1][0]]
        for axis in (0, 1):
            if self.resized[axis] == self.shape[axis]:
                take = slice(out[axis][0] - inside[axis][0], out[axis][1] - inside[axis][0])
                maps = maps[:, take] if axis == 0 else maps[:, :, take]
            else:
                maps = _resample(maps, axis + 1, self.resized[axis], self.shape[axis], out[axis], inside[axis][0])
        return np.ascontiguousarray(maps, dtype=np.float32)


def _style_cell(grid: _NetGrid, core: tuple[slice, slice]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The part of the padded field whose deepest features a block's core stands for in the style
    sum: the cores' cells partition the padded field, borders included."""
    return (
        (grid.boundary(0, core[0].start), grid.boundary(0, core[0].stop)),
        (grid.boundary(1, core[1].start), grid.boundary(1, core[1].stop)),
    )


def _window(grid: _NetGrid, out, context: int, must):
    return tuple(grid.window(axis, out[axis], context, must[axis]) for axis in (0, 1))


class _StyleProbe(Exception):
    """Raised by ``_PoolFeatures`` to stop a forward pass once the encoder's pooled features are known."""

    def __init__(self, total: torch.Tensor, count: int):
        super().__init__("style probe")
        self.total = total
        self.count = count


class _PoolFeatures(torch.nn.Module):
    """Stands in for CPnet's ``make_style`` in pass 1: the sum of the deepest features over a
    block's style cell (``cell``: net-input pixels of the window, ``size``: the window's), then
    stops the pass. Cells and windows are aligned to the pooling grid, so the crop is exact."""

    def __init__(self, cell: tuple[int, int, int, int], size: tuple[int, int]):
        super().__init__()
        self.cell = cell
        self.size = size

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        sy, sx = self.size[0] // x0.shape[-2], self.size[1] // x0.shape[-1]
        y0, y1, x0_, x1 = self.cell
        region = x0[..., y0 // sy : y1 // sy, x0_ // sx : x1 // sx].float()
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


def _grids(shape: tuple[int, int], channel_models: Sequence[ChannelModel]) -> list[_NetGrid]:
    return [_NetGrid.of(shape, _rescale_factor(m.net, m.diameter)) for m in channel_models]


def _fixed(normalizations: Sequence[Normalization], image) -> list[Normalization]:
    """Fixed low/high per channel: percentile settings become the field's own percentiles (a block's
    percentiles would differ from block to block)."""
    out = list(normalizations)
    for c, norm in enumerate(out):
        if norm.low is None:
            out[c] = _field_normalization(image, c, norm.lower_percentile, norm.upper_percentile)
    return out


def field_styles(
    image,
    channel_models: Sequence[ChannelModel],
    normalizations: Sequence[Normalization],
    plan: BlockPlan,
    *,
    max_blocks: int = 64,
) -> list[np.ndarray]:
    """The style vector each channel's net computes over the whole field.

    CPnet's style is the normalised global mean of its deepest features over the padded field,
    broadcast into the decoder: a block alone gets its own style and so different maps everywhere.
    The field's sum is the sum over the blocks' style cells (which partition the padded field),
    each read with ``plan.overlap`` of context; with more than ``max_blocks`` blocks, evenly spread
    blocks are probed instead (the style is a direction, so a sample's mean is an estimate of it).
    Encoder only.
    """
    picks = np.unique(np.linspace(0, len(plan.cores) - 1, min(max_blocks, len(plan.cores))).astype(int))
    norms = _fixed(normalizations, image)
    styles = []
    for k, (model, grid) in enumerate(zip(channel_models, _grids(plan.shape, channel_models))):
        total, count = None, 0
        context = int(math.ceil(plan.overlap * grid.rescale))
        for i in picks:
            core = plan.cores[i]
            cell = _style_cell(grid, core)
            if cell[0][1] <= cell[0][0] or cell[1][1] <= cell[1][0]:
                continue  # a thin core's cell rounded away: its neighbour's cell holds it
            win = _window(grid, ((core[0].start, core[0].stop), (core[1].start, core[1].stop)), context, cell)
            batch, _inside = grid.net_input(image, k, norms[k], win)
            crop = (cell[0][0] - win[0][0], cell[0][1] - win[0][0], cell[1][0] - win[1][0], cell[1][1] - win[1][0])
            try:
                with _style_module(model.net, _PoolFeatures(crop, batch.shape[-2:])):
                    _forward(model.net, batch, channels_last=FAST_PATH_CHANNELS_LAST)
            except _StyleProbe as probe:
                block_total, block_count = probe.total[0].double().cpu(), probe.count
            else:  # pragma: no cover - the probe always fires
                raise RuntimeError("the style probe did not run")
            total = block_total if total is None else total + block_total
            count += block_count
        mean = total / count  # type: ignore[operator]
        styles.append((mean / mean.norm()).float().numpy())  # type: ignore[union-attr]
    return styles


def _region_maps(
    image,
    out: tuple[tuple[int, int], tuple[int, int]],
    context_px: int,
    channel_models: Sequence[ChannelModel],
    grids: Sequence[_NetGrid],
    normalizations: Sequence[Normalization],
    styles: Sequence[np.ndarray],
    weights,
) -> np.ndarray:
    """Fused (3, h, w) maps of field pixels ``out``, each channel's net reading its window of the
    padded field with ``context_px`` field pixels of context around them."""
    maps = []
    for k, (model, grid) in enumerate(zip(channel_models, grids)):
        context = int(math.ceil(context_px * grid.rescale))
        win = _window(grid, out, context, ((grid.padded[0], 0), (grid.padded[1], 0)))
        batch, inside = grid.net_input(image, k, normalizations[k], win)
        with _style_module(model.net, _FixedStyle(torch.from_numpy(styles[k])[None])):
            y, _style = _forward(model.net, batch, channels_last=FAST_PATH_CHANNELS_LAST)
        maps.append(grid.field_maps(y[0], win, inside, out))
    return fuse_maps(maps, weights)


def _span(window: tuple[slice, slice]) -> tuple[tuple[int, int], tuple[int, int]]:
    return (window[0].start, window[0].stop), (window[1].start, window[1].stop)


def _clear_of_edge(box: tuple[int, int, int, int], read: tuple[slice, slice], shape: tuple[int, int]) -> bool:
    """Whether an object (bounding box y0, y1, x0, x1 in field pixels) lies in a block's read
    window without touching one of its edges inside the field (where the block cut it)."""
    y0, y1, x0, x1 = box
    for lo, hi, window, size in ((y0, y1, read[0], shape[0]), (x0, x1, read[1], shape[1])):
        if lo < window.start or hi > window.stop:
            return False
        if (lo == window.start and window.start > 0) or (hi == window.stop and window.stop < size):
            return False
    return True


def _owner(plan: BlockPlan, centroid: tuple[float, float], box: tuple[int, int, int, int]) -> int:
    """The block that keeps an object (see the module notes): a function of the object alone, so
    every block that sees it decides the same."""
    rows, cols = plan.grid
    row = min(rows - 1, int(centroid[0]) // plan.block_size)
    col = min(cols - 1, int(centroid[1]) // plan.block_size)
    home = row * cols + col
    if _clear_of_edge(box, plan.reads[home], plan.shape):
        return home
    best, best_distance = -1, math.inf
    reach = 1 + plan.overlap // plan.block_size
    for r in range(max(0, row - reach), min(rows, row + reach + 1)):
        for c in range(max(0, col - reach), min(cols, col + reach + 1)):
            i = r * cols + c
            if not _clear_of_edge(box, plan.reads[i], plan.shape):
                continue
            core = plan.cores[i]
            cy, cx = (core[0].start + core[0].stop) / 2, (core[1].start + core[1].stop) / 2
            distance = math.hypot(centroid[0] - cy, centroid[1] - cx)
            if distance < best_distance:
                best, best_distance = i, distance
    return best


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
    out=None,
) -> BlockedResult:
    """Flow Fusion labels of a (K, Y, X) field segmented block by block (see the module notes).

    ``block_size``: core side in pixels (default: the largest that fits ``memory_budget_bytes``);
    ``overlap``: context and halo in pixels (default 2 object diameters); ``mode``: "maps",
    "labels" or None (chosen by the budget). ``normalizations``: per channel; percentile settings
    are turned into the field's own percentiles. ``out``: an optional (Y, X) int32 array-like to
    write labels into.
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
    norms = _fixed(normalizations, image) if normalizations is not None else field_normalizations(image)
    plan = plan_blocks((ly, lx), block_size, overlap)
    grids = _grids((ly, lx), models)
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
        for core in plan.cores:
            fused[:, core[0], core[1]] = _region_maps(
                image, _span(core), overlap, models, grids, norms, styles, weights
            )
        labels = masks_from_maps(fused, **mask_args)  # type: ignore[arg-type]
        del fused
        if out is not None:
            out[...] = labels
            labels = out
        return BlockedResult(labels, "maps", plan, norms, stats, styles)

    labels = out if out is not None else np.zeros((ly, lx), np.int32)
    next_label = 1
    dropped_duplicates = 0
    # Objects kept lie within about half a diameter of the core; half an overlap more context
    # gives their maps the full overlap of context, as in maps mode.
    context = int(math.ceil(overlap / 2))
    kept_min_size = min_size_for(min_size, diameter, diam_mean)  # as masks_from_maps reads it
    for i, read in enumerate(plan.reads):
        maps = _region_maps(image, _span(read), context, models, grids, norms, styles, weights)
        block_labels = masks_from_maps(maps, **mask_args)  # type: ignore[arg-type]
        del maps
        n = int(block_labels.max())
        if n == 0:
            continue
        centroids = ndimage.center_of_mass(np.ones_like(block_labels, np.float32), block_labels, range(1, n + 1))
        placed = np.asarray(labels[read[0], read[1]])
        updated = placed.copy()
        oy, ox = read[0].start, read[1].start
        for lab, (box, centroid) in enumerate(zip(ndimage.find_objects(block_labels), centroids), start=1):
            if box is None:
                continue
            field_box = (box[0].start + oy, box[0].stop + oy, box[1].start + ox, box[1].stop + ox)
            if _owner(plan, (centroid[0] + oy, centroid[1] + ox), field_box) != i:
                continue
            mine = block_labels[box] == lab
            there = placed[box][mine]
            if np.count_nonzero(there):
                # Seen slightly differently by a neighbour that kept it: drop if it mostly overlaps.
                ids, counts = np.unique(there[there > 0], return_counts=True)
                best, inter = ids[np.argmax(counts)], int(counts.max())
                area_best = int(np.count_nonzero(placed == best))
                if inter / (int(mine.sum()) + area_best - inter) >= 0.5:
                    dropped_duplicates += 1
                    continue
            free = mine & (updated[box] == 0)
            if np.count_nonzero(free) < kept_min_size:
                continue
            view = updated[box]
            view[free] = next_label
            next_label += 1
        labels[read[0], read[1]] = updated
    stats["dropped_duplicates"] = dropped_duplicates
    return BlockedResult(labels, "labels", plan, norms, stats, styles)
