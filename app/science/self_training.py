"""Annotation-free, marker-controlled training (after Din & Yu, Sci. Rep. 11, 23995, 2021, "cellcutter").

No annotation is used. Per image:

1. **markers** from a nuclear channel (real stain, or one predicted by an ISL model): Determinant-of-
   Hessian blobs (``classical.detect_markers``, as the paper), completed with one marker per
   nucleus-sized foreground blob that DoH missed (our addition: DoH found ~2/3 of the nuclei of the
   synthetic plates);
2. **foreground** by a graph cut (PyMaxflow, Boykov-Kolmogorov): a two-class Gaussian intensity model
   initialised by Otsu's split gives the unary costs, a Potts term on the 4-neighbour grid the
   smoothness;
3. a small CNN sees, for every marker, a patch of the image centred on it plus a Gaussian position
   channel that says which object is meant, and outputs that object's probability map over the patch;
4. the **marker-controlled patch loss** (below) is minimised on the images themselves;
5. **instances** by per-pixel maximum over the patches: a pixel belongs to the marker whose patch gives
   it the highest probability, when that probability exceeds 0.5.

The loss, per image with patches i = 1..N at their image positions, y_i = sigmoid(logits_i):

    L = - sum_i mean_p y_i(p)
        + lam  * sum_i mean_p y_i(p) * ( - sum_{j != i} log(1 - y_j(p)) )
        + beta * sum_i mean_p y_i(p) * background(p)

The first term rewards each patch for covering area; the second is the cross term of the published
implementation (``cutter_loss`` in cellcutter: the neighbours' log(1 - y_j) accumulated on an image
template, multiplied by y_i): claiming a pixel that a neighbour claims with confidence costs a lot
(log barrier), a pixel nobody else claims costs nothing. The third is the background-mask term: pixels
the graph cut calls background count as claimed by an outside object. Why this form and not a plain
overlap product y_i * y_j: the log barrier keeps the boundary between two touching cells where both
probabilities cross, instead of letting the larger object win the overlap linearly; and without the
background term an isolated cell's patch has no reason to stop growing (only the area reward acts).
We use beta as a separate weight (the reference folds the mask into the template) so that a noisy
foreground can be trusted less than the neighbours.

The masks this produces are pseudo-labels: ``training.finetune`` on a reporter channel with them gives a
CellFuse model with zero annotations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from app.science.classical import (
    complete_markers,
    detect_markers,
    estimate_diameter,
    normalise01,
)
from app.science.training import TrainingCancelled


class SelfTrainingError(ValueError):
    """Input the annotation-free training cannot use."""


# --- foreground by graph cut ----------------------------------------------------------------------


def graphcut_foreground(image: np.ndarray, *, smoothness: float = 2.0, sigma: float = 1.0) -> np.ndarray:
    """Boolean foreground of one channel by a min-cut (PyMaxflow) on the 4-neighbour grid.

    Unary costs: negative log-likelihoods under two Gaussians (background, foreground) whose means and
    spreads come from Otsu's split of the smoothed, normalised image; pairwise: a Potts penalty of
    ``smoothness`` per cut edge (removes speckle that a bare threshold keeps).
    """
    import maxflow
    from skimage.filters import gaussian, threshold_otsu

    smoothed = gaussian(normalise01(image), sigma=sigma, preserve_range=True).astype(np.float64)
    if float(smoothed.max()) == float(smoothed.min()):
        return np.zeros(smoothed.shape, bool)
    split = threshold_otsu(smoothed)
    costs = []
    for part in (smoothed <= split, smoothed > split):
        values = smoothed[part] if part.any() else smoothed.ravel()
        mean, spread = float(values.mean()), max(float(values.std()), 1e-3)
        costs.append(0.5 * ((smoothed - mean) / spread) ** 2 + math.log(spread))
    background_cost, foreground_cost = costs
    graph = maxflow.Graph[float]()
    nodes = graph.add_grid_nodes(smoothed.shape)
    graph.add_grid_edges(nodes, weights=float(smoothness), symmetric=True)
    # Source side = foreground: the sink capacity is the cost of calling a pixel foreground.
    graph.add_grid_tedges(nodes, background_cost, foreground_cost)
    graph.maxflow()
    return ~graph.get_grid_segments(nodes)


# --- the patch network ----------------------------------------------------------------------------


class PatchNet(nn.Module):
    """A small dilated CNN: (B, 2, P, P) [image patch, position channel] -> (B, P, P) logits."""

    def __init__(self, width: int = 24, dilations: Sequence[int] = (1, 2, 4, 8, 1)):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 2
        for dilation in dilations:
            layers += [
                nn.Conv2d(channels, width, 3, padding=dilation, dilation=dilation),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            channels = width
        layers.append(nn.Conv2d(width, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[:, 0]


@dataclass(frozen=True)
class SelfTrainConfig:
    #: Patch side in units of the object diameter (2 covers a nucleus and its neighbours' edges).
    patch_scale: float = 2.0
    lam: float = 1.0
    beta: float = 2.0
    learning_rate: float = 0.002
    epochs: int = 40
    width: int = 24
    marker_threshold: float = 0.002
    graphcut_smoothness: float = 2.0
    min_size: int = 15
    #: Add a marker to each nucleus-sized foreground blob DoH missed (``classical.complete_markers``).
    complete_markers: bool = True
    seed: int = 0
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if self.patch_scale <= 0 or self.epochs < 1 or self.learning_rate <= 0 or self.width < 1:
            raise SelfTrainingError("patch_scale, epochs, learning_rate and width must be positive")
        if self.lam < 0 or self.beta < 0:
            raise SelfTrainingError("lam and beta cannot be negative")

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass
class _Image:
    """One image prepared for the patch loss: padded arrays and flat patch indices."""

    patches: torch.Tensor  # (N, 2, P, P) network input
    index: torch.Tensor  # (N, P*P) flat indices into the padded image
    background: torch.Tensor  # (N, P*P) 1 where the graph cut said background (or outside the image)
    padded_size: int
    shape: tuple[int, int]
    markers: np.ndarray


def _position_channel(patch: int, diameter: float) -> np.ndarray:
    """A Gaussian bump at the patch centre (sigma = diameter / 4): says which object is meant."""
    centre = (patch - 1) / 2.0
    yy, xx = np.mgrid[:patch, :patch]
    return np.exp(-((yy - centre) ** 2 + (xx - centre) ** 2) / (2 * (diameter / 4.0) ** 2)).astype(np.float32)


def patch_size(diameter: float, scale: float) -> int:
    """An odd patch side of about ``scale * diameter`` (odd: the marker is its centre pixel)."""
    side = max(9, math.ceil(scale * diameter))
    return side if side % 2 else side + 1


def _prepare(image: np.ndarray, foreground: np.ndarray, markers: np.ndarray, diameter: float, patch: int) -> _Image:
    half = patch // 2
    normalised = np.pad(normalise01(image), half, mode="reflect")
    outside = np.pad(~np.asarray(foreground, bool), half, mode="constant", constant_values=True)
    ly, lx = normalised.shape
    position = _position_channel(patch, diameter)
    offsets = (np.arange(patch)[:, None] * lx + np.arange(patch)[None, :]).ravel()
    patches, indices = [], []
    for row, col in markers:  # marker (row, col) -> top-left (row, col) in the padded image
        patches.append(np.stack([normalised[row : row + patch, col : col + patch], position]))
        indices.append(row * lx + col + offsets)
    index = torch.from_numpy(np.asarray(indices, np.int64).reshape(len(markers), patch * patch))
    background = torch.from_numpy(outside.ravel()[index.numpy()].astype(np.float32))
    return _Image(
        torch.from_numpy(np.asarray(patches, np.float32).reshape(len(markers), 2, patch, patch)),
        index,
        background,
        ly * lx,
        image.shape,
        markers,
    )


def patch_loss(
    logits: torch.Tensor,
    index: torch.Tensor,
    background: torch.Tensor,
    padded_size: int,
    lam: float = 1.0,
    beta: float = 2.0,
) -> torch.Tensor:
    """The marker-controlled loss (module docstring) of one image's (N, P, P) patch logits."""
    n = logits.shape[0]
    y = torch.sigmoid(logits.reshape(n, -1))
    log_free = torch.nn.functional.logsigmoid(-logits.reshape(n, -1))  # log(1 - y), stable
    template = torch.zeros(padded_size, dtype=y.dtype).index_add(0, index.reshape(-1), log_free.reshape(-1))
    neighbours = template[index] - log_free  # sum over j != i of log(1 - y_j), at patch i's pixels
    area = y.mean(dim=1).sum()
    cross = (y * -neighbours).mean(dim=1).sum()
    outside = (y * background).mean(dim=1).sum()
    return -area + lam * cross + beta * outside


def instances_from_patches(
    probabilities: torch.Tensor | np.ndarray, prepared: _Image, *, min_size: int = 15, threshold: float = 0.5
) -> np.ndarray:
    """Per-pixel maximum over the patches: label = the marker whose patch is most confident, if > threshold."""
    probabilities = torch.as_tensor(probabilities).reshape(len(prepared.markers), -1)
    best = torch.zeros(prepared.padded_size)
    owner = torch.zeros(prepared.padded_size, dtype=torch.int64)
    for i in range(probabilities.shape[0]):
        index = prepared.index[i]
        better = probabilities[i] > best[index]
        best[index[better]] = probabilities[i][better]
        owner[index[better]] = i + 1
    patch = round(math.sqrt(prepared.index.shape[1]))
    half = patch // 2
    ly, lx = prepared.shape
    labels = torch.where(best > threshold, owner, 0).reshape(ly + 2 * half, lx + 2 * half)
    labels = labels[half : half + ly, half : half + lx].numpy().astype(np.int32)
    return _clean(labels, prepared.markers, min_size)


def _clean(labels: np.ndarray, markers: np.ndarray, min_size: int) -> np.ndarray:
    """Keep each label's connected piece that holds its marker (or the largest); drop tiny objects."""
    from scipy import ndimage as ndi
    from skimage.segmentation import relabel_sequential

    out = np.zeros_like(labels)
    objects = ndi.find_objects(labels)
    for value, box in enumerate(objects, start=1):
        if box is None:
            continue
        pieces, n = ndi.label(labels[box] == value)
        if n == 0:
            continue
        row, col = markers[value - 1]
        local = (row - box[0].start, col - box[1].start)
        inside = 0 <= local[0] < pieces.shape[0] and 0 <= local[1] < pieces.shape[1]
        keep = pieces[local] if inside and pieces[local] else int(np.argmax(np.bincount(pieces.ravel())[1:]) + 1)
        piece = pieces == keep
        if piece.sum() >= min_size:
            out[box][piece] = value
    return relabel_sequential(out)[0].astype(np.int32)


@dataclass(frozen=True)
class SelfTrainEpoch:
    epoch: int
    loss: float
    elapsed_s: float


@dataclass(frozen=True)
class SelfTrainResult:
    labels: list[np.ndarray]  # pseudo-labels, one (Y, X) int32 per image
    markers: list[np.ndarray]
    foregrounds: list[np.ndarray]
    diameter: float
    history: list[SelfTrainEpoch]
    net: PatchNet


def self_train(
    marker_images: Sequence[np.ndarray],
    foreground_images: Sequence[np.ndarray] | None = None,
    *,
    diameter: float | None = None,
    config: SelfTrainConfig = SelfTrainConfig(),
    on_epoch: Callable[[SelfTrainEpoch], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SelfTrainResult:
    """Pseudo-label instance masks for each image without any annotation.

    ``marker_images``: the nuclear channel (markers come from it); ``foreground_images``: the channel
    whose objects are wanted (the nuclear channel itself for nuclei, a cytoplasmic one for cells;
    default: the marker images); the network sees the foreground channel. ``diameter``: the nucleus
    diameter in pixels (default: estimated from the first image by Otsu); patches are
    ``config.patch_scale`` times it.
    """
    marker_images = [np.asarray(m, np.float32) for m in marker_images]
    if not marker_images:
        raise SelfTrainingError("no images: give at least one nuclear-channel image")
    foreground_images = (
        marker_images if foreground_images is None else [np.asarray(f, np.float32) for f in foreground_images]
    )
    if len(foreground_images) != len(marker_images):
        raise SelfTrainingError(f"{len(marker_images)} marker images but {len(foreground_images)} foreground images")
    for m, f in zip(marker_images, foreground_images):
        if m.ndim != 2 or m.shape != f.shape:
            raise SelfTrainingError(
                f"marker and foreground images must be matching (Y, X) channels: {m.shape}, {f.shape}"
            )
    if diameter is None:
        diameter = float(np.median([estimate_diameter(m) for m in marker_images]))
    torch.manual_seed(config.seed)
    patch = patch_size(diameter, config.patch_scale)
    prepared: list[_Image] = []
    foregrounds, all_markers = [], []
    for marker_image, foreground_image in zip(marker_images, foreground_images):
        foreground = graphcut_foreground(foreground_image, smoothness=config.graphcut_smoothness)
        markers = detect_markers(
            marker_image,
            diameter=diameter,
            threshold=config.marker_threshold,
            foreground=foreground if foreground_image is marker_image else None,
        )
        if config.complete_markers:
            markers = complete_markers(
                markers,
                graphcut_foreground(marker_image, smoothness=config.graphcut_smoothness)
                if foreground_image is not marker_image
                else foreground,
                min_area=max(config.min_size, int(0.1 * diameter**2)),
            )
        foregrounds.append(foreground)
        all_markers.append(markers)
        prepared.append(_prepare(foreground_image, foreground, markers, diameter, patch))
    trainable = [p for p in prepared if len(p.markers)]
    net = PatchNet(config.width)
    history: list[SelfTrainEpoch] = []
    started = time.perf_counter()
    if trainable:
        optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate)
        rng = np.random.default_rng(config.seed)
        for epoch in range(config.epochs):
            net.train()
            total = 0.0
            for i in rng.permutation(len(trainable)):
                if should_stop is not None and should_stop():
                    raise TrainingCancelled(f"self-training cancelled during epoch {epoch}")
                item = trainable[i]
                loss = patch_loss(
                    net(item.patches), item.index, item.background, item.padded_size, config.lam, config.beta
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() / len(item.markers)
            history.append(SelfTrainEpoch(epoch, total / len(trainable), time.perf_counter() - started))
            if on_epoch is not None:
                on_epoch(history[-1])
            if config.time_limit_s is not None and time.perf_counter() - started > config.time_limit_s:
                break
    net.eval()
    labels = []
    with torch.no_grad():
        for item in prepared:
            if not len(item.markers):
                labels.append(np.zeros(item.shape, np.int32))
                continue
            labels.append(instances_from_patches(torch.sigmoid(net(item.patches)), item, min_size=config.min_size))
    return SelfTrainResult(labels, all_markers, foregrounds, float(diameter), history, net)
