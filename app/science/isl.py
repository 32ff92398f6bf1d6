"""In-silico labelling (ISL) pretraining of a CPnet: predict a structural stain from other channels.

Method: Bonte et al., 2024 ("Learning with minimal effort: leveraging in silico labeling for cell and
nucleus segmentation"): pretrain the segmentation network on an image-to-image pretext task that needs
no annotation (label-free or reporter channel -> nuclear or membrane stain, L1 loss, best checkpoint on
the validation loss), then transfer the *whole* network to the segmentation fine-tune on 1-10
annotated images.

How CellFuse keeps the result a CellFuse model: the network is an ordinary CPnet (``[reporter, zeros]``
in, ``[flow Y, flow X, cell probability]`` out) and the pretext target is regressed from its
**cell-probability output map** (channel 2); there is no extra head. Why that map:

- the fine-tune trains that same map (with a BCE on the logit) to be positive inside the objects the
  stain shows and negative outside; a stain rescaled to a logit-like range (``TARGET_LOGIT_SCALE``:
  background ~ -3, bright stain ~ +3) is already a rough cell probability of those objects, so the
  pretext pre-aligns the head instead of throwing it away;
- the saved weights are byte-compatible with every other zoo model (same keys, same shapes, loadable
  by Cellpose for full-width nets), so a fine-tune accepts them as a base without special cases.

The flow maps get no pretext loss (they have no target here); the encoder, decoder and style path
all learn from the stain, which is what transfers.

Sources with several channels are used channel-wise (each source channel paired with the stain is one
training pair), as CellFuse's per-reporter models see one reporter at a time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from app.science.backbone import INPUT_CHANNELS, build_network, network_widths
from app.science.training import TrainingCancelled, normalise_image

#: The stain, normalised to [0, 1] (1st-99th percentile), is regressed as ``scale * (t - 0.5)``.
TARGET_LOGIT_SCALE = 6.0
#: The output channel of CPnet that carries the pretext prediction (the cell-probability logit).
PRETEXT_OUTPUT_CHANNEL = 2


class ISLDataError(ValueError):
    """Paired images that cannot be used for ISL pretraining."""


@dataclass(frozen=True)
class ISLConfig:
    """Pretext training settings; AdamW with Cellpose's fine-tuning rate, validation every epoch."""

    learning_rate: float = 0.002
    weight_decay: float = 1e-5
    batch_size: int = 8
    bsize: int = 224
    max_epochs: int = 100
    min_epochs: int = 5
    patience: int = 10
    #: Random crops drawn per training pair and epoch (small datasets still fill batches).
    crops_per_pair: int = 2
    val_crops_per_pair: int = 2
    seed: int = 0
    time_limit_s: float | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1 or self.crops_per_pair < 1:
            raise ISLDataError("batch_size, max_epochs, patience and crops_per_pair must be at least 1")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.bsize < 16:
            raise ISLDataError("learning_rate must be > 0, weight_decay >= 0 and bsize >= 16")

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class ISLEpoch:
    epoch: int
    train_loss: float
    val_loss: float
    val_correlation: float
    elapsed_s: float
    is_best: bool = False


@dataclass(frozen=True)
class ISLResult:
    net: torch.nn.Module  # best-validation checkpoint, eval mode
    best_epoch: int
    best_val_loss: float
    val_correlation: float  # Pearson r of predicted vs true stain on the validation pairs, best epoch
    history: list[ISLEpoch]
    stop_reason: str
    n_train: int
    n_val: int


def stain_target(stain: np.ndarray) -> np.ndarray:
    """The regression target of one stain image: normalised, clipped to [0, 1], on a logit-like scale.

    >>> t = stain_target(np.linspace(0, 100, 101, dtype=np.float32).reshape(1, -1))
    >>> float(t.min()), float(t.max())
    (-3.0, 3.0)
    """
    normalised = np.clip(normalise_image(stain), 0.0, 1.0)
    return (TARGET_LOGIT_SCALE * (normalised - 0.5)).astype(np.float32)


def _pairs(sources: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Channel-wise (source (Y, X), stain (Y, X)) pairs; a (K, Y, X) source gives K pairs."""
    if len(sources) != len(targets):
        raise ISLDataError(f"got {len(sources)} source images but {len(targets)} target stains")
    pairs = []
    for index, (source, target) in enumerate(zip(sources, targets)):
        source, target = np.asarray(source, np.float32), np.asarray(target, np.float32)
        if target.ndim != 2:
            raise ISLDataError(f"target stain {index} must be one (Y, X) channel, got shape {target.shape}")
        channels = source[None] if source.ndim == 2 else source
        if channels.ndim != 3 or channels.shape[1:] != target.shape:
            raise ISLDataError(
                f"source {index} has shape {source.shape}; give (Y, X) or (K, Y, X) matching its stain {target.shape}"
            )
        for channel in channels:
            pairs.append((channel, target))
    return pairs


def _prepare(pairs, zoom: float, bsize: int) -> list[np.ndarray]:
    """Each pair as a normalised (2, Y, X) array [source, target], resized by ``zoom``, at least bsize."""
    prepared = []
    for source, target in pairs:
        stacked = np.stack([normalise_image(source), stain_target(target)], axis=-1)
        if zoom != 1.0:
            size = (max(8, round(stacked.shape[1] * zoom)), max(8, round(stacked.shape[0] * zoom)))
            stacked = cv2.resize(stacked, size, interpolation=cv2.INTER_LINEAR)
        pad_y, pad_x = max(0, bsize - stacked.shape[0]), max(0, bsize - stacked.shape[1])
        if pad_y or pad_x:  # reflect keeps the statistics of small images (no zero border to learn)
            stacked = np.pad(stacked, ((0, pad_y), (0, pad_x), (0, 0)), mode="reflect")
        prepared.append(np.ascontiguousarray(stacked.transpose(2, 0, 1)))
    return prepared


def _crop(pair: np.ndarray, bsize: int, rng: np.random.Generator, augment: bool) -> np.ndarray:
    y0 = int(rng.integers(0, pair.shape[1] - bsize + 1))
    x0 = int(rng.integers(0, pair.shape[2] - bsize + 1))
    crop = pair[:, y0 : y0 + bsize, x0 : x0 + bsize]
    if augment:  # rotations and flips: the stain has no preferred orientation
        crop = np.rot90(crop, int(rng.integers(4)), axes=(1, 2))
        if rng.random() < 0.5:
            crop = crop[:, :, ::-1]
    return np.ascontiguousarray(crop)


def _batch_tensors(crops: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    stack = np.stack(crops)  # (B, 2, Y, X): [source, target]
    x = np.zeros((len(crops), INPUT_CHANNELS, *stack.shape[-2:]), np.float32)
    x[:, 0] = stack[:, 0]
    return torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(stack[:, 1]))


def pretext_prediction(output: torch.Tensor) -> torch.Tensor:
    """The stain prediction (B, Y, X) from a CPnet's (B, 3, Y, X) output."""
    return output[:, PRETEXT_OUTPUT_CHANNEL]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays (NaN when either is constant).

    >>> round(pearson(np.arange(5.0), 2 * np.arange(5.0) + 1), 6)
    1.0
    """
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else math.nan


def _validate(net: torch.nn.Module, batches) -> tuple[float, float]:
    if not batches:
        return math.nan, math.nan
    net.eval()
    total, count, predictions, targets = 0.0, 0, [], []
    with torch.no_grad():
        for x, y in batches:
            prediction = pretext_prediction(net(x)[0])
            total += torch.nn.functional.l1_loss(prediction, y, reduction="sum").item() / y[0].numel()
            count += len(x)
            predictions.append(prediction.numpy())
            targets.append(y.numpy())
    return total / count, pearson(np.concatenate(predictions), np.concatenate(targets))


def pretrain_isl(
    train_sources: Sequence[np.ndarray],
    train_targets: Sequence[np.ndarray],
    val_sources: Sequence[np.ndarray],
    val_targets: Sequence[np.ndarray],
    config: ISLConfig = ISLConfig(),
    *,
    widths: tuple[int, ...] | None = None,
    init_net: torch.nn.Module | None = None,
    diameter: float | None = None,
    diam_mean: float = 30.0,
    on_epoch: Callable[[ISLEpoch], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ISLResult:
    """Train a CPnet to predict the target stain from each source channel (L1); keep the best epoch.

    ``diameter``: the typical object size in pixels in these images, when known; images are then
    resized so that objects are ``diam_mean`` wide, as in the later fine-tune (so the pretext features
    live at the scale segmentation will use). ``init_net`` (a copy is trained) or a fresh CPnet of
    ``widths``. Early stopping on the validation L1 after ``min_epochs``; ``should_stop`` is polled
    between steps and raises ``training.TrainingCancelled``.
    """
    train_pairs = _pairs(train_sources, train_targets)
    val_pairs = _pairs(val_sources, val_targets)
    if not train_pairs:
        raise ISLDataError("no training pairs: give at least one source image with its target stain")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if init_net is not None:
        model = build_network(network_widths(init_net), diam_mean=float(init_net.diam_mean.item()))
        model.load_state_dict(init_net.state_dict(), strict=True)
    else:
        model = build_network(widths or (16, 32, 64, 128), diam_mean=diam_mean)
    zoom = float(model.diam_mean.item()) / diameter if diameter else 1.0
    train = _prepare(train_pairs, zoom, config.bsize)
    val = _prepare(val_pairs, zoom, config.bsize)
    val_rng = np.random.default_rng(config.seed + 1)
    val_crops = [_crop(p, config.bsize, val_rng, False) for p in val for _ in range(config.val_crops_per_pair)]
    val_batches = [
        _batch_tensors(val_crops[i : i + config.batch_size]) for i in range(0, len(val_crops), config.batch_size)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    started = time.perf_counter()
    history: list[ISLEpoch] = []
    best = (math.inf, -1, None, math.nan)  # loss, epoch, state, correlation
    waited, stop_reason = 0, "max_epochs"
    for epoch in range(config.max_epochs):
        model.train()
        order = np.repeat(np.arange(len(train)), config.crops_per_pair)
        rng.shuffle(order)
        epoch_loss = 0.0
        for start in range(0, len(order), config.batch_size):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"ISL pretraining cancelled during epoch {epoch}")
            batch = order[start : start + config.batch_size]
            x, y = _batch_tensors([_crop(train[i], config.bsize, rng, True) for i in batch])
            loss = torch.nn.functional.l1_loss(pretext_prediction(model(x)[0]), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item() * len(x)
        train_loss = epoch_loss / len(order)
        val_loss, correlation = _validate(model, val_batches)
        criterion = val_loss if val_batches else train_loss
        is_best = criterion < best[0]
        if is_best:
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best, waited = (criterion, epoch, state, correlation), 0
        elif epoch >= config.min_epochs:
            waited += 1
        report = ISLEpoch(epoch, train_loss, val_loss, correlation, time.perf_counter() - started, is_best)
        history.append(report)
        if on_epoch is not None:
            on_epoch(report)
        if val_batches and waited >= config.patience:
            stop_reason = "patience"
            break
        if config.time_limit_s is not None:
            elapsed = time.perf_counter() - started
            if elapsed + elapsed / len(history) > config.time_limit_s:
                stop_reason = "time_limit"
                break
    loss, best_epoch, state, correlation = best
    result_net = build_network(network_widths(model), diam_mean=float(model.diam_mean.item()))
    result_net.load_state_dict(state if state is not None else model.state_dict(), strict=True)
    if diameter:  # the pretext scale: a later fine-tune overwrites it with its own training diameter
        result_net.diam_labels.data = torch.tensor([float(diameter)], dtype=torch.float32)
    result_net.eval()
    return ISLResult(
        net=result_net,
        best_epoch=best_epoch,
        best_val_loss=float(loss) if val_batches else math.nan,
        val_correlation=float(correlation),
        history=history,
        stop_reason=stop_reason,
        n_train=len(train),
        n_val=len(val),
    )


def predict_stain(net: torch.nn.Module, source: np.ndarray, *, diameter: float | None = None) -> np.ndarray:
    """The predicted stain (Y, X), normalised back to ~[0, 1], for one (Y, X) source image.

    Untiled full-image pass (padded to a multiple of 16), at the pretext's scale when ``diameter``
    is given.
    """
    source = np.asarray(source, np.float32)
    if source.ndim != 2:
        raise ISLDataError(f"give one (Y, X) source channel, got shape {source.shape}")
    zoom = float(net.diam_mean.item()) / diameter if diameter else 1.0
    image = normalise_image(source)
    if zoom != 1.0:
        image = cv2.resize(
            image,
            (max(8, round(image.shape[1] * zoom)), max(8, round(image.shape[0] * zoom))),
            interpolation=cv2.INTER_LINEAR,
        )
    ly, lx = image.shape
    py, px = (-ly) % 16, (-lx) % 16
    x = np.zeros((1, INPUT_CHANNELS, ly + py, lx + px), np.float32)
    x[0, 0] = np.pad(image, ((0, py), (0, px)), mode="reflect")
    net.eval()
    with torch.no_grad():
        out = pretext_prediction(net(torch.from_numpy(x))[0])[0, :ly, :lx].numpy()
    if zoom != 1.0:
        out = cv2.resize(out, (source.shape[1], source.shape[0]), interpolation=cv2.INTER_LINEAR)
    return (out / TARGET_LOGIT_SCALE + 0.5).astype(np.float32)
