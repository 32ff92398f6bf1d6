"""Channel-wise fine-tuning of a Cellpose CPnet on one reporter channel, with early stopping.

The loop reuses Cellpose's pieces (flow targets from ``cellpose.dynamics.masks_to_flows``, its
normalisation, its loss written out on tensors, its learning-rate schedule) and adds what
``cellpose.train.train_seg`` lacks: microscopy augmentations, a validation loss every epoch,
patience-based early stopping that only starts after ``min_epochs``, keeping the *best* checkpoint,
cancellation and progress callbacks.

Images are single-channel (Y, X) reporter images; the network sees ``[reporter, zeros]``.
Training images are rescaled per image so that objects are ``diam_mean`` pixels wide (as Cellpose
does); the mean training diameter is recorded and is the diameter to give at inference.
"""

from __future__ import annotations

import copy
import hashlib
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from cellpose import dynamics, utils
from cellpose.transforms import normalize99
from skimage.segmentation import relabel_sequential

from app.science.augmentations import AugmentationConfig, augment
from app.science.backbone import build_network, network_input_channels, network_widths
from app.science.device import DeviceError, autocast, module_device

if TYPE_CHECKING:
    from app.science.metrics import SegmentationScores

#: Cellpose clamps training diameters below this (pixels) to avoid huge rescale factors.
MIN_DIAMETER = 5.0


class TrainingDataError(ValueError):
    """The training or validation data cannot be used as given."""


class TrainingCancelled(Exception):
    """Raised inside ``finetune`` when ``should_stop()`` returned True."""


@dataclass(frozen=True)
class TrainingConfig:
    """Cellpose 3 ``train.train_seg`` defaults plus early stopping and augmentation switches.

    ``learning_rate``, ``weight_decay``, AdamW (``sgd=False``), ``batch_size``, ``bsize``,
    ``rescale``, ``min_train_masks`` and the schedule (linear warm-up over 10 epochs, halvings at
    the end) are Cellpose's. ``max_epochs`` defaults to Cellpose's CLI ``n_epochs`` (500).
    """

    learning_rate: float = 0.005
    weight_decay: float = 1e-5
    sgd: bool = False
    momentum: float = 0.9
    batch_size: int = 8
    bsize: int = 224
    rescale: bool = True
    min_train_masks: int = 5
    warmup_epochs: int = 10
    max_epochs: int = 500
    patience: int = 20
    #: BatchNorm momentum is 0.05, so eval-mode validation loss swings early: patience waits.
    min_epochs: int = 20
    augment: bool = True
    microscopy_augment: bool = True
    #: Fixed (unaugmented) validation crops per validation image, drawn once.
    val_crops_per_image: int = 2
    seed: int = 0
    #: Optional directory for flow targets keyed by the mask's sha256 (computed once, reused).
    flow_cache_dir: str | None = None
    #: Wall-clock budget: no new epoch starts when it would likely end past this (best kept).
    time_limit_s: float | None = None
    #: NHWC convolutions: a training step took ~20-25 % less CPU time here (half and full width).
    channels_last: bool = True
    #: Cellpose's per-image 1st-99th percentile scaling. False when the images come already scaled
    #: by dataset-level percentiles (a preprocessing recipe), which must not be undone per image.
    normalize_per_image: bool = True
    #: Random zoom range around the training rescale (objects at diam_mean x this factor).
    scale_range: tuple[float, float] = (0.5, 1.0)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise TrainingDataError("batch_size, max_epochs and patience must all be at least 1")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise TrainingDataError("learning_rate must be > 0 and weight_decay >= 0")
        if self.min_epochs < 0 or self.warmup_epochs < 0:
            raise TrainingDataError("min_epochs and warmup_epochs cannot be negative")

    def augmentation(self) -> AugmentationConfig:
        return AugmentationConfig(
            bsize=self.bsize,
            enabled=self.augment,
            microscopy=self.microscopy_augment,
            scale_range=tuple(self.scale_range),
        )

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class DatasetSplit:
    """Indices of the training, validation and test images (disjoint, sorted)."""

    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]


@dataclass(frozen=True)
class EpochReport:
    epoch: int
    train_loss: float
    val_loss: float  # NaN when there is no validation set
    elapsed_s: float
    learning_rate: float = 0.0
    is_best: bool = False


@dataclass
class TrainingCheckpoint:
    """Everything needed to continue training after ``epoch`` exactly as if it had not stopped.

    Plain tensors, numbers, strings, lists and dicts only (``as_state``), so that it is saved with
    ``torch.save`` and read back with ``torch.load(weights_only=True)``: no pickled objects.
    """

    epoch: int  # the last finished epoch
    model: dict[str, torch.Tensor]
    optimizer: dict
    best_state: dict[str, torch.Tensor] | None
    best_loss: float
    best_epoch: int
    epochs_without_improvement: int
    history: list[EpochReport]
    numpy_rng: dict
    torch_rng: torch.Tensor
    elapsed_s: float

    def as_state(self) -> dict:
        return {
            "epoch": self.epoch,
            "model": self.model,
            "optimizer": self.optimizer,
            "best_state": self.best_state,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
            "history": [
                [r.epoch, r.train_loss, r.val_loss, r.elapsed_s, r.learning_rate, r.is_best] for r in self.history
            ],
            "numpy_rng": self.numpy_rng,
            "torch_rng": self.torch_rng,
            "elapsed_s": self.elapsed_s,
        }

    @classmethod
    def from_state(cls, state: dict) -> TrainingCheckpoint:
        history = [
            EpochReport(int(e), float(t), float(v), float(s), float(lr), bool(b))
            for e, t, v, s, lr, b in state["history"]
        ]
        return cls(
            epoch=int(state["epoch"]),
            model=state["model"],
            optimizer=state["optimizer"],
            best_state=state["best_state"],
            best_loss=float(state["best_loss"]),
            best_epoch=int(state["best_epoch"]),
            epochs_without_improvement=int(state["epochs_without_improvement"]),
            history=history,
            numpy_rng=state["numpy_rng"],
            torch_rng=state["torch_rng"],
            elapsed_s=float(state["elapsed_s"]),
        )


@dataclass(frozen=True)
class TrainingResult:
    net: torch.nn.Module  # best checkpoint loaded, eval mode
    best_epoch: int
    history: list[EpochReport]
    diameter: float  # mean training diameter: give this at inference
    stopped_early: bool
    stop_reason: str = "max_epochs"  # "patience", "time_limit" or "max_epochs"
    diameter_plus_sd: float = 0.0
    best_val_loss: float = math.nan
    n_train: int = 0
    n_val: int = 0
    device: str = "cpu"  # where it was trained
    precision: str = "fp32"  # autocast precision of the training steps (provenance)


def split_dataset(n: int, *, n_train: int = 40, n_val: int = 5, n_test: int = 5, seed: int = 0) -> DatasetSplit:
    """A seeded random split; with n != n_train + n_val + n_test the proportions are kept.

    Every part gets at least one image when n >= 3 (validation and test first to the training set).

    >>> split = split_dataset(50)
    >>> len(split.train), len(split.val), len(split.test)
    (40, 5, 5)
    >>> [len(p) for p in (split_dataset(10).train, split_dataset(10).val, split_dataset(10).test)]
    [8, 1, 1]
    """
    if n < 3:
        raise TrainingDataError(f"need at least 3 annotated images to split into train/val/test, got {n}")
    if min(n_train, n_val, n_test) < 0 or n_train + n_val + n_test == 0:
        raise TrainingDataError("n_train, n_val and n_test must be non-negative and not all zero")
    total = n_train + n_val + n_test
    if total == n:
        sizes = [n_train, n_val, n_test]
    else:
        n_val_p = max(1, round(n * n_val / total)) if n_val else 0
        n_test_p = max(1, round(n * n_test / total)) if n_test else 0
        sizes = [n - n_val_p - n_test_p, n_val_p, n_test_p]
        if sizes[0] < 1:
            raise TrainingDataError(f"{n} images are too few for the requested split {n_train}/{n_val}/{n_test}")
    order = np.random.default_rng(seed).permutation(n)
    parts = np.split(order, np.cumsum(sizes)[:-1])
    train, val, test = (tuple(sorted(int(i) for i in part)) for part in parts)
    return DatasetSplit(train, val, test)


def image_diameters(masks: Sequence[np.ndarray]) -> np.ndarray:
    """Cellpose's per-image diameter (median equivalent-circle diameter), clamped at 5 px."""
    diameters = np.array([utils.diameters(np.asarray(m))[0] for m in masks], dtype=np.float64)
    return np.maximum(diameters, MIN_DIAMETER)


def training_diameters(masks: Sequence[np.ndarray]) -> tuple[float, float]:
    """(mean, mean + 1 sd) of the per-image diameters.

    The mean is the diameter that matches training (give it at inference to a fine-tuned model);
    mean + 1 sd is what works best for an un-tuned base model.

    >>> yy, xx = np.mgrid[:64, :64]
    >>> disc = ((yy - 32) ** 2 + (xx - 32) ** 2 < 10 ** 2).astype(np.int32)
    >>> mean, plus_sd = training_diameters([disc, disc])
    >>> round(mean, 1), round(plus_sd - mean, 6)
    (19.7, 0.0)
    """
    if len(masks) == 0:
        raise TrainingDataError("no masks given: cannot compute a training diameter")
    diameters = image_diameters(masks)
    return float(diameters.mean()), float(diameters.mean() + diameters.std())


def learning_rate_schedule(n_epochs: int, learning_rate: float, warmup_epochs: int = 10) -> np.ndarray:
    """Cellpose's schedule: linear warm-up from 0, constant, then halvings over the last epochs."""
    rates = np.linspace(0, learning_rate, warmup_epochs) if warmup_epochs else np.zeros(0)
    rates = np.append(rates, learning_rate * np.ones(max(0, n_epochs - warmup_epochs)))
    if n_epochs > 300:
        rates = rates[:-100]
        for _ in range(10):
            rates = np.append(rates, rates[-1] / 2 * np.ones(10))
    elif n_epochs > 100:
        rates = rates[:-50]
        for _ in range(10):
            rates = np.append(rates, rates[-1] / 2 * np.ones(5))
    return rates[:n_epochs]


def mask_sha256(mask: np.ndarray) -> str:
    """Content hash of a label image (shape and dtype included)."""
    digest = hashlib.sha256(f"{mask.shape}|{mask.dtype.str}|".encode())
    digest.update(np.ascontiguousarray(mask).tobytes())
    return digest.hexdigest()


def flow_targets(mask: np.ndarray, *, cache_dir: str | Path | None = None) -> np.ndarray:
    """Cellpose training targets (3, Y, X) = [cell probability, flow Y, flow X] for one label image.

    With ``cache_dir`` the result is stored as ``<sha256>.npy`` and reused.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise TrainingDataError(f"a mask must be a 2-D integer label image, got {mask.dtype} {mask.shape}")
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"{mask_sha256(mask)}.npy"
        if cache_path.exists():
            cached = np.load(cache_path, allow_pickle=False)
            if cached.shape == (3, *mask.shape):
                return cached
    labels = relabel_sequential(mask.astype(np.int64))[0]
    flows = dynamics.masks_to_flows(labels, device=torch.device("cpu"))
    targets = np.concatenate([(labels > 0)[None].astype(np.float32), flows.astype(np.float32)])
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_path.with_suffix(".tmp.npy")
        np.save(temporary, targets, allow_pickle=False)
        temporary.replace(cache_path)
    return targets


def normalise_image(image: np.ndarray) -> np.ndarray:
    """Cellpose's per-image 1st-99th percentile normalisation to float32 (constant image -> 0)."""
    return normalize99(np.asarray(image, dtype=np.float32))


def segmentation_loss(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cellpose's loss: MSE on 5x the unit flows (halved) + BCE on the cell probability logit."""
    flow_loss = F.mse_loss(output[:, :2], 5.0 * targets[:, 1:]) / 2.0
    probability_loss = F.binary_cross_entropy_with_logits(output[:, 2], (targets[:, 0] > 0.5).float())
    return flow_loss + probability_loss


def fresh_copy(net: torch.nn.Module, device: torch.device | str | None = None) -> torch.nn.Module:
    """A new CPnet with the same widths, input channels, diam_mean and weights, on ``device``
    (default: ``net``'s).

    Training a net after eval trips MKL-DNN, and cached nets are shared: training works on a copy.
    """
    device = module_device(net) if device is None else torch.device(device)
    new = build_network(
        network_widths(net), diam_mean=float(net.diam_mean.item()), nchan=network_input_channels(net), device=device
    )
    new.load_state_dict(net.state_dict(), strict=True)
    return new


@dataclass
class _PreparedSet:
    images: list[np.ndarray]  # (C, Y, X) normalised, each channel on its own
    targets: list[np.ndarray]  # (3, Y, X)
    zooms: list[float]
    diameters: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _check_pairs(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], what: str, n_channels: int = 1) -> None:
    """Single-reporter (Y, X) images, or (K, Y, X) fields for a joint model (``n_channels`` = K)."""
    if len(images) != len(masks):
        raise TrainingDataError(f"{what}: {len(images)} images but {len(masks)} masks; give one mask per image")
    for index, (image, mask) in enumerate(zip(images, masks)):
        image, mask = np.asarray(image), np.asarray(mask)
        if n_channels == 1 and image.ndim != 2:
            raise TrainingDataError(
                f"{what} image {index} has shape {image.shape}; give single-channel (Y, X) reporter images"
            )
        if n_channels > 1 and (image.ndim != 3 or image.shape[0] != n_channels):
            raise TrainingDataError(
                f"{what} image {index} has shape {image.shape}; the joint model takes "
                f"{n_channels} input channels: give ({n_channels}, Y, X) fields"
            )
        if mask.shape != image.shape[-2:]:
            raise TrainingDataError(f"{what} mask {index} has shape {mask.shape} but its image is {image.shape}")
        if not np.issubdtype(mask.dtype, np.integer):
            raise TrainingDataError(f"{what} mask {index} must be an integer label image, got {mask.dtype}")


def _prepare(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], diam_mean: float, config: TrainingConfig
) -> _PreparedSet:
    diameters = image_diameters(masks) if len(masks) else np.zeros(0)
    zooms = [diam_mean / d if config.rescale else 1.0 for d in diameters]
    return _PreparedSet(
        images=[_normalise_channels(np.asarray(image), config.normalize_per_image) for image in images],
        targets=[flow_targets(np.asarray(mask), cache_dir=config.flow_cache_dir) for mask in masks],
        zooms=zooms,
        diameters=diameters,
    )


def _normalise_channels(image: np.ndarray, per_image: bool = True) -> np.ndarray:
    """(Y, X) -> (1, Y, X); (K, Y, X) -> each channel normalised on its own (or kept, when the
    images come already normalised, e.g. with plate-level percentiles)."""
    channels = image[None] if image.ndim == 2 else image
    if not per_image:
        return np.asarray(channels, np.float32)
    return np.stack([normalise_image(channel) for channel in channels])


def _with_zero_channel(batch: np.ndarray, channels_last: bool = False, n_in: int = 2) -> torch.Tensor:
    """(B, C, Y, X) crops -> (B, n_in, Y, X) network input: [reporter, zeros] for the zoo's models."""
    zeros = np.zeros((batch.shape[0], 1, *batch.shape[2:]), batch.dtype)
    stacked = torch.from_numpy(
        np.ascontiguousarray(np.concatenate([batch] + [zeros] * (n_in - batch.shape[1]), axis=1))
    )
    return stacked.contiguous(memory_format=torch.channels_last) if channels_last else stacked


def _validation_crops(
    prepared: _PreparedSet, config: TrainingConfig, n_in: int = 2
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, unaugmented validation crops, batched; drawn once so every epoch sees the same ones."""
    rng = np.random.default_rng(config.seed + 1)
    plain = AugmentationConfig(bsize=config.bsize, enabled=False)
    inputs, targets = [], []
    for image, target, zoom in zip(prepared.images, prepared.targets, prepared.zooms):
        for _ in range(config.val_crops_per_image):
            crop, crop_targets = augment(image, target, rng, plain, zoom=zoom)
            inputs.append(crop)
            targets.append(crop_targets)
    batches = []
    for start in range(0, len(inputs), config.batch_size):
        x = _with_zero_channel(np.stack(inputs[start : start + config.batch_size]), config.channels_last, n_in)
        y = torch.from_numpy(np.stack(targets[start : start + config.batch_size]))
        batches.append((x, y))
    return batches


def _validation_loss(
    net: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: str = "fp32"
) -> float:
    if not batches:
        return math.nan
    net.eval()
    device = module_device(net)
    total, count = torch.zeros((), device=device), 0
    with torch.no_grad():
        for x, y in batches:
            with autocast(device, precision):
                output = net(x)[0]
            total += segmentation_loss(output.float(), y) * len(x)
            count += len(x)
    return float(total.item()) / count


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class BatchPrefetcher:
    """Augmented training batches made on a thread of their own while the network trains.

    Draws from ``rng`` in exactly the order the serial loop did (one permutation per epoch, then
    one augmentation per image in that order), so a seed gives the same batches as before; it
    runs at most ``depth`` batches ahead. For a CUDA device the batches are put in pinned memory
    so that their copy to the GPU overlaps the running kernels.
    """

    def __init__(
        self,
        train: _PreparedSet,
        rng: np.random.Generator,
        augmentation: AugmentationConfig,
        *,
        batch_size: int,
        epochs: int,
        channels_last: bool,
        pin_memory: bool = False,
        depth: int = 3,
        n_in: int = 2,
    ):
        self._train, self._rng, self._augmentation = train, rng, augmentation
        self._n_in = n_in
        self._batch_size, self._epochs = batch_size, epochs
        self._channels_last, self._pin = channels_last, pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        # The generator's state as each epoch starts (index = epochs since this prefetcher began),
        # for checkpoints that resume with the same random stream.
        self._rng_states: dict[int, dict] = {}
        self._states_ready = threading.Condition()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, name="cellfuse-train-data", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        train = self._train
        n = len(train.images)
        try:
            for epoch in range(self._epochs + 1):
                self._record_rng_state(epoch)
                if epoch == self._epochs:
                    break
                order = self._rng.permutation(n)
                for start in range(0, n, self._batch_size):
                    crops, targets = [], []
                    for index in order[start : start + self._batch_size]:
                        crop, crop_targets = augment(
                            train.images[index],
                            train.targets[index],
                            self._rng,
                            self._augmentation,
                            zoom=train.zooms[index],
                        )
                        crops.append(crop)
                        targets.append(crop_targets)
                    x = _with_zero_channel(np.stack(crops), self._channels_last, self._n_in)
                    y = torch.from_numpy(np.stack(targets))
                    if self._pin:
                        x, y = x.pin_memory(), y.pin_memory()
                    if not self._put((x, y)):
                        return
        except BaseException as error:  # noqa: BLE001 - re-raised on the training thread
            self._put(_Failed(error))
        finally:
            with self._states_ready:
                self._finished = True
                self._states_ready.notify_all()

    def _record_rng_state(self, epoch: int) -> None:
        with self._states_ready:
            self._rng_states[epoch] = copy.deepcopy(dict(self._rng.bit_generator.state))
            self._states_ready.notify_all()

    def rng_state_before(self, epoch: int) -> dict:
        """The random generator's state as epoch ``epoch`` (counted from this prefetcher's first)
        began its draws: the state a run resumed there must start from."""
        with self._states_ready:
            self._states_ready.wait_for(lambda: epoch in self._rng_states or self._finished)
            if epoch not in self._rng_states:
                raise RuntimeError(f"the batch thread stopped before epoch {epoch}")
            return copy.deepcopy(self._rng_states[epoch])

    def batches(self, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The next ``n_batches`` batches (one epoch)."""
        for _ in range(n_batches):
            item = self._queue.get()
            if isinstance(item, _Failed):
                raise item.error
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def finetune(
    net: torch.nn.Module,
    train_images: Sequence[np.ndarray],
    train_masks: Sequence[np.ndarray],
    val_images: Sequence[np.ndarray],
    val_masks: Sequence[np.ndarray],
    config: TrainingConfig = TrainingConfig(),
    *,
    on_epoch: Callable[[EpochReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_checkpoint: Callable[[TrainingCheckpoint], None] | None = None,
    resume_from: TrainingCheckpoint | None = None,
    on_best: Callable[[int, dict], None] | None = None,
    joint: bool = False,
    device: torch.device | str | None = None,
    precision: str = "fp32",
) -> TrainingResult:
    """Fine-tune a copy of ``net`` on (Y, X) reporter images; return the best-validation checkpoint.

    ``net`` itself is not modified. Early stopping: once ``epoch >= min_epochs``, training stops after
    ``patience`` epochs without a new best validation loss (without validation images the training
    loss decides and training runs ``max_epochs``). ``should_stop`` is polled between steps and
    raises ``TrainingCancelled``. ``on_checkpoint`` receives the state after each epoch; given as
    ``resume_from`` (same data and config), training continues after that epoch with the same
    weights, optimizer and random streams, so the result equals an uninterrupted run. Training runs
    on ``device`` (default: ``net``'s) with the forward pass under autocast in ``precision`` (fp16
    with a gradient scaler); augmented batches are made on a thread of their own
    (``BatchPrefetcher``). The returned net is on ``device``. ``joint=True``: ``net`` is a joint
    model (``backbone.joint_network``, K input channels) and the images are (K, Y, X) fields.
    """
    n_in = network_input_channels(net)
    n_channels = n_in if joint else 1
    _check_pairs(train_images, train_masks, "training", n_channels)
    _check_pairs(val_images, val_masks, "validation", n_channels)
    if precision not in ("fp32", "bf16", "fp16"):
        raise DeviceError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    started = time.perf_counter()

    device = module_device(net) if device is None else torch.device(device)
    model = fresh_copy(net, device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    diam_mean = float(model.diam_mean.item())
    counts = [len(np.unique(np.asarray(m))) - int((np.asarray(m) == 0).any()) for m in train_masks]
    keep = [i for i, c in enumerate(counts) if c >= config.min_train_masks]
    if not keep:
        raise TrainingDataError(
            f"no training image has at least min_train_masks={config.min_train_masks} annotated objects "
            f"(counts: {counts}); annotate more objects or lower min_train_masks"
        )
    train_images = [train_images[i] for i in keep]
    train_masks = [train_masks[i] for i in keep]
    train = _prepare(train_images, train_masks, diam_mean, config)
    val = _prepare(val_images, val_masks, diam_mean, config)
    diameter, diameter_plus_sd = training_diameters(train_masks)
    model.diam_labels.data = torch.tensor([diameter], dtype=torch.float32, device=device)
    val_batches = [(x.to(device), y.to(device)) for x, y in _validation_crops(val, config, n_in)]
    augmentation = config.augmentation()

    if config.sgd:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay, momentum=config.momentum
        )
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    rates = learning_rate_schedule(config.max_epochs, config.learning_rate, config.warmup_epochs)

    history: list[EpochReport] = []
    best_loss, best_epoch, best_state = math.inf, -1, None
    epochs_without_improvement = 0
    first_epoch = 0
    if resume_from is not None:
        model.load_state_dict(resume_from.model, strict=True)
        optimizer.load_state_dict(resume_from.optimizer)
        best_loss, best_epoch, best_state = resume_from.best_loss, resume_from.best_epoch, resume_from.best_state
        epochs_without_improvement = resume_from.epochs_without_improvement
        history = list(resume_from.history)
        rng.bit_generator.state = resume_from.numpy_rng
        torch.set_rng_state(resume_from.torch_rng)
        started -= resume_from.elapsed_s
        first_epoch = resume_from.epoch + 1
    stop_reason = "max_epochs"
    n_train = len(train.images)
    n_batches = math.ceil(n_train / config.batch_size)
    prefetcher = BatchPrefetcher(
        train,
        rng,
        augmentation,
        batch_size=config.batch_size,
        epochs=config.max_epochs - first_epoch,
        channels_last=config.channels_last,
        pin_memory=device.type == "cuda",
        n_in=n_in,
    )
    try:
        for epoch in range(first_epoch, config.max_epochs):
            for group in optimizer.param_groups:
                group["lr"] = float(rates[epoch])
            model.train()
            epoch_loss = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no sync per step
            for x, y in prefetcher.batches(n_batches):
                if should_stop is not None and should_stop():
                    raise TrainingCancelled(f"training cancelled during epoch {epoch}")
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(device, precision):
                    output = model(x)[0]
                loss = segmentation_loss(output.float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                epoch_loss += loss.detach() * len(x)
            train_loss = float(epoch_loss.item()) / n_train
            val_loss = _validation_loss(model, val_batches, precision)
            criterion = val_loss if val_batches else train_loss
            is_best = criterion < best_loss
            if is_best:
                best_loss, best_epoch = criterion, epoch
                best_state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
                epochs_without_improvement = 0
                if on_best is not None:  # the best weights of long runs, as they come
                    on_best(epoch, best_state)
            elif epoch >= config.min_epochs:
                epochs_without_improvement += 1
            report = EpochReport(
                epoch, train_loss, val_loss, time.perf_counter() - started, float(rates[epoch]), is_best
            )
            history.append(report)
            if on_checkpoint is not None:
                # The random stream as the next epoch starts (the prefetch thread runs ahead of it).
                on_checkpoint(
                    TrainingCheckpoint(
                        epoch=epoch,
                        model={k: v.detach().clone() for k, v in model.state_dict().items()},
                        optimizer=copy.deepcopy(optimizer.state_dict()),
                        best_state=best_state,
                        best_loss=best_loss,
                        best_epoch=best_epoch,
                        epochs_without_improvement=epochs_without_improvement,
                        history=list(history),
                        numpy_rng=prefetcher.rng_state_before(epoch + 1 - first_epoch),
                        torch_rng=torch.get_rng_state(),
                        elapsed_s=time.perf_counter() - started,
                    )
                )
            if on_epoch is not None:
                on_epoch(report)
            if val_batches and epochs_without_improvement >= config.patience:
                stop_reason = "patience"
                break
            if config.time_limit_s is not None and epoch < config.max_epochs - 1:
                elapsed = time.perf_counter() - started
                if elapsed + elapsed / len(history) > config.time_limit_s:
                    stop_reason = "time_limit"
                    break
    finally:
        prefetcher.close()

    if best_state is None:  # every loss was NaN: keep the last weights rather than nothing
        best_state = copy.deepcopy(model.state_dict())
        best_epoch = len(history) - 1
    result_net = build_network(network_widths(model), diam_mean=diam_mean, nchan=n_in, device=device)
    result_net.load_state_dict(best_state, strict=True)
    result_net.eval()
    return TrainingResult(
        net=result_net,
        best_epoch=best_epoch,
        history=history,
        diameter=diameter,
        stopped_early=stop_reason != "max_epochs",
        stop_reason=stop_reason,
        diameter_plus_sd=diameter_plus_sd,
        best_val_loss=best_loss if val_batches else math.nan,
        n_train=n_train,
        n_val=len(val.images),
        device=str(device),
        precision=precision,
    )


@dataclass(frozen=True)
class Evaluation:
    """Pooled scores of a model on a set of annotated images, with its predicted masks."""

    scores: SegmentationScores
    masks: list[np.ndarray]
    diameters: tuple[float, ...]

    def as_dict(self) -> dict:
        return {**self.scores.as_dict(), "n_images": len(self.masks)}


def evaluate_model(
    net: torch.nn.Module,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    diameter: float | Sequence[float] | None,
    *,
    tile: bool = True,
    flow_threshold: float | None = 0.4,
    cellprob_threshold: float = 0.0,
    min_size: int = 15,
) -> Evaluation:
    """Segment each (Y, X) image with Cellpose's pipeline and score against the masks (pooled).

    ``diameter``: one value for all images (the training diameter of a fine-tuned model), one per
    image, or None for the net's recorded ``diam_labels``.
    """
    from app.science.backbone import masks_from_maps, predict_maps
    from app.science.metrics import score_set

    if len(images) != len(masks) or len(images) == 0:
        raise TrainingDataError(
            f"need the same, non-zero number of images and masks; got {len(images)} and {len(masks)}"
        )
    if diameter is None or np.isscalar(diameter):
        per_image = [diameter if diameter is not None else float(net.diam_labels.item())] * len(images)
    else:
        per_image = [float(d) for d in np.atleast_1d(diameter)]
        if len(per_image) != len(images):
            raise TrainingDataError(f"got {len(per_image)} diameters for {len(images)} images")
    diam_mean = float(net.diam_mean.item())
    net.eval()
    predicted = []
    for image, image_diameter in zip(images, per_image):
        maps = predict_maps(net, np.asarray(image), diameter=float(image_diameter), tile=tile)
        predicted.append(
            masks_from_maps(
                maps,
                diameter=float(image_diameter),
                diam_mean=diam_mean,
                flow_threshold=flow_threshold,
                cellprob_threshold=cellprob_threshold,
                min_size=min_size,
            )
        )
    scores = score_set([np.asarray(m) for m in masks], predicted)
    return Evaluation(scores=scores, masks=predicted, diameters=tuple(float(d) for d in per_image))


def run_cellpose_train_seg(
    net: torch.nn.Module,
    train_images: Sequence[np.ndarray],
    train_masks: Sequence[np.ndarray],
    val_images: Sequence[np.ndarray],
    val_masks: Sequence[np.ndarray],
    *,
    save_dir: str | Path,
    n_epochs: int,
    batch_size: int = 8,
    bsize: int = 224,
    learning_rate: float = 0.005,
    weight_decay: float = 1e-5,
    min_train_masks: int = 1,
    device: torch.device | str | None = None,
) -> tuple[float, np.ndarray]:
    """Cellpose's own ``train.train_seg`` on (Y, X) reporter images (as [reporter, zeros]), for
    comparisons; trains a fresh copy of ``net`` on ``device`` (default ``net``'s; Cellpose trains on
    its net's device). Returns (wall seconds, per-epoch training losses).
    """
    from cellpose import train

    _check_pairs(train_images, train_masks, "training")
    _check_pairs(val_images, val_masks, "validation")
    model = fresh_copy(net, device)

    def two_channel(image: np.ndarray) -> np.ndarray:
        return np.stack([np.asarray(image, np.float32), np.zeros(np.shape(image), np.float32)])

    # A complete normalisation dict: Cellpose mutates its module default when given a bool.
    normalize = {
        "normalize": True,
        "norm3D": True,
        "invert": False,
        "lowhigh": None,
        "percentile": [1.0, 99.0],
        "sharpen_radius": 0,
        "smooth_radius": 0,
        "tile_norm_blocksize": 0,
        "tile_norm_smooth3D": 1,
    }
    started = time.perf_counter()
    _, train_losses, _ = train.train_seg(
        model,
        train_data=[two_channel(i) for i in train_images],
        train_labels=[np.asarray(m) for m in train_masks],
        test_data=[two_channel(i) for i in val_images] or None,
        test_labels=[np.asarray(m) for m in val_masks] or None,
        batch_size=batch_size,
        bsize=bsize,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        n_epochs=n_epochs,
        normalize=normalize,
        save_path=str(save_dir),
        model_name="cellpose_train_seg",
        min_train_masks=min_train_masks,
    )
    return time.perf_counter() - started, np.asarray(train_losses)


#: Recentring passes of the size model's style estimate (``recentred_style_diameter``); 0 is
#: Cellpose's single pass, the default. On the base v3's 12 validation images rescaled 0.5x-2x
#: (untiled), 3 passes that stop once the next zoom is within ``RECENTRE_TOLERANCE`` of 1 cut the
#: mean |log(estimate / true)| over the five scales from 0.107 to 0.071 (2x: 0.248 -> 0.068;
#: 0.75x-1x: 0.068 / 0.049 -> 0.079 / 0.063), and the early stop and the crop bound their cost (the
#: page's 1024-px field: no extra pass). Not the default because on the 48 held-out images at 1.5x
#: one walking estimate gave 970 false positives (pooled F1 0.895 -> 0.672), and with the step guard
#: added for it (``size_model.MAX_LAST_RECENTRE_STEP``) another one at 2x gave 1914 (0.877 -> 0.535).
#: A tolerance of log 1.25 skipped too many images: the single pass shrinks 2x images' estimates
#: to within 25 % of the centre (|log| at 2x 0.185).
RECENTRE_ITERATIONS = 0
RECENTRE_TOLERANCE = math.log(1.15)


def train_size_model(
    net: torch.nn.Module,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    scales: Sequence[float] | None = None,
    diameter_range: tuple[float, float] | None = None,
    samples_per_image: int = 3,
    max_side: int = 448,
    ridge: float = 1.0,
    seed: int = 0,
):
    """Cellpose 3's ``train_size`` for a trained net: style vectors of each image resized by a few
    factors (net run at its own scale, i.e. no diameter rescale) regressed on log(diameter x factor).

    ``scales``: fixed resize factors per image. ``diameter_range`` (instead): ``samples_per_image``
    resizes per image whose object diameters are drawn log-uniformly in that range (e.g. 8-80 px),
    each from a random crop no larger than ``max_side`` pixels after resizing (bounded cost, as
    Cellpose fits on crops). Returns a ``size_model.SizeModel``; ``estimate_image_diameter``
    applies it with Cellpose's second pass.
    """
    import cv2

    from app.science.backbone import predict_maps
    from app.science.size_model import fit_size_model

    _check_pairs(images, masks, "size-model")
    if len(images) == 0:
        raise TrainingDataError("need at least one annotated image to fit a size model")
    if scales is None and diameter_range is None:
        scales = (0.5, 0.75, 1.0, 1.25, 1.5)
    rng = np.random.default_rng(seed)
    diam_mean = float(net.diam_mean.item())
    net.eval()
    styles, diameters = [], []
    for image, diameter in zip(images, image_diameters(masks)):
        image = np.asarray(image, np.float32)
        if scales is not None:
            factors = list(scales)
        else:
            low, high = np.log(diameter_range[0]), np.log(diameter_range[1])
            factors = [float(np.exp(rng.uniform(low, high)) / diameter) for _ in range(samples_per_image)]
        for factor in factors:
            crop = image
            if diameter_range is not None:
                side = max(16, int(max_side / factor))
                y0 = int(rng.integers(0, max(1, image.shape[0] - side + 1)))
                x0 = int(rng.integers(0, max(1, image.shape[1] - side + 1)))
                crop = image[y0 : y0 + side, x0 : x0 + side]
            size = (max(16, round(crop.shape[1] * factor)), max(16, round(crop.shape[0] * factor)))
            interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
            resized = cv2.resize(crop, size, interpolation=interpolation)
            styles.append(predict_maps(net, resized, diameter=diam_mean).style)
            diameters.append(diameter * size[1] / crop.shape[0])
    return fit_size_model(np.stack(styles), np.asarray(diameters), ridge=ridge, diam_mean=diam_mean)


def predict_diameter(net: torch.nn.Module, size_model, image: np.ndarray) -> float:
    """Object diameter (pixels) of one (Y, X) image from the net's style vector and a size model
    (the first pass only; ``estimate_image_diameter`` adds Cellpose's second pass)."""
    from app.science.backbone import predict_maps

    style = predict_maps(net, np.asarray(image, np.float32), diameter=float(net.diam_mean.item())).style
    return float(size_model.predict(style))


#: Longest side (pixels, after zooming) of the image a recentring pass runs on: a style is an
#: average over the image, so a centred crop of this size estimates it (~700 objects at the 19-px
#: centre), and a 2160-px field of 5-px nuclei (zoomed 4x) would otherwise cost three extra 8640-px
#: passes. On the validation images 512 and 1024 gave the same errors (0.070 vs 0.071 at 1.5x).
RECENTRE_MAX_SIDE = 512


def _centre_crop_for_zoom(image: np.ndarray, zoom: float, max_side: int = RECENTRE_MAX_SIDE) -> np.ndarray:
    """The centred crop of ``image`` whose sides, zoomed by ``zoom``, are at most ``max_side``."""
    limit = max(16, int(max_side / zoom))
    ly, lx = image.shape[-2:]
    y0, x0 = max(0, (ly - limit) // 2), max(0, (lx - limit) // 2)
    return image[..., y0 : y0 + limit, x0 : x0 + limit]


def estimate_image_diameter(
    net: torch.nn.Module,
    size_model,
    image: np.ndarray,
    *,
    flow_threshold: float | None = 0.4,
    cellprob_threshold: float = 0.0,
    min_size: int = 15,
    tile: bool = True,
    normalization=None,
    recentre_iterations: int = RECENTRE_ITERATIONS,
    recentre_tolerance: float = RECENTRE_TOLERANCE,
    recentre_max_side: int = RECENTRE_MAX_SIDE,
):
    """Cellpose 3's ``SizeModel.eval`` for one (Y, X) image: the style regression's diameter, then
    the median diameter of the masks segmented at it. Returns a ``size_model.SizeEstimate``.
    ``normalization`` (a ``backbone.Normalization``): default Cellpose's per-image percentiles.

    ``recentre_iterations`` > 0: the style pass is repeated on the image zoomed so that its objects
    sit at the regression's centre (``size_model.recentred_style_diameter``), which undoes the
    ridge's shrinkage for objects far from the training size; 0 is Cellpose's single pass."""
    from app.science.backbone import Normalization, masks_from_maps, predict_maps
    from app.science.size_model import estimate_diameter, recentred_style_diameter

    image = np.asarray(image, np.float32)
    norm = normalization if normalization is not None else Normalization()
    diam_mean = float(net.diam_mean.item())

    def style_at(diameter: float) -> np.ndarray:
        return predict_maps(
            net,
            _centre_crop_for_zoom(image, diam_mean / diameter, recentre_max_side),
            diameter=diameter,
            tile=tile,
            normalization=norm,
        ).style

    style = predict_maps(net, image, diameter=diam_mean, tile=tile, normalization=norm).style
    style_diameter = recentred_style_diameter(
        style_at, size_model, iterations=recentre_iterations, first_style=style, tolerance=recentre_tolerance
    )

    def segment(diameter: float) -> np.ndarray:
        maps = predict_maps(net, image, diameter=diameter, tile=tile, normalization=norm)
        return masks_from_maps(
            maps,
            diameter=diameter,
            diam_mean=diam_mean,
            flow_threshold=flow_threshold,
            cellprob_threshold=cellprob_threshold,
            min_size=min_size,
        )

    return estimate_diameter(style, size_model, segment, style_diameter=style_diameter)
