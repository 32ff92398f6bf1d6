"""Few-shot benchmark: segmentation quality against the number of annotated training images.

``cellfuse bench few-shot`` fine-tunes the same half-width CPnet from four starting points on
n = 1, 2, 5, 10 annotated images (a seeded, nested choice from a pool) and scores it on held-out
fields; at n = 0 it scores what needs no annotation. Lines:

- ``random``: a randomly initialised CPnet (seeded);
- ``shipped base``: ``models_zoo/weights`` (cellfuse-base, trained on DSB2018 + synthetic fields);
- ``ISL init``: a CPnet pretrained from random initialisation on the in-silico-labelling pretext
  (``app.science.isl``, Bonte et al. 2024) on unannotated paired images, then fine-tuned;
- ``ISL from base``: the same pretext, started from the shipped base (the lab's unannotated images adapt
  the generalist), then fine-tuned;
- ``self-trained``: the shipped base fine-tuned on pseudo-labels of the pool made by the
  marker-controlled training (``app.science.self_training``, Din & Yu 2021): 0 annotations; then
  ``self-trained + n``: that model fine-tuned on n annotated images;
- ``classical`` (a line): CellProfiler-style smoothing + Otsu + seeded watershed from the same markers,
  on the stain; ``cellcutter (stain)``: the marker-controlled training run directly on the held-out
  stain images (transductive, as the paper uses it), from the same markers.

Two datasets:

- **synthetic**: plates from ``app.science.synthetic`` (real DSB2018 masks under rendered reporters);
  the task is nuclei from the translocating reporter (no stain at inference); the nuclear-stain
  channel is the ISL target (pretext sources: the three reporters of other plates) and the marker
  channel for self-training and the classical line;
- **DSB2018**: nuclei in real fluorescence stain images; pool from ``dsb2018_fluo_more``, test = the
  shipped base's held-out images (never trained on). There is no second channel, so the ISL pretext
  source is a degraded rendering of the stain (blur, uneven illumination, few photons, read noise) and
  the target the stain itself; images are rescaled by an Otsu-based diameter estimate (no masks used).

Every fine-tune gets the same number of optimiser steps (small lists are repeated to fill batches),
no validation set (the n images are all there is; the last-but-best training-loss checkpoint is kept)
and each test image is segmented at its true diameter, so lines differ only in their starting point.
Intervals are min-max over seeds. The CPU here is shared: budgets are steps, not minutes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

COUNTS = (0, 1, 2, 5, 10)
#: Nucleus size (pixels) DSB2018 images are brought to for the marker-controlled training and classical line.
SELF_TRAIN_DIAMETER = 20.0
LINES = ("random", "shipped base", "ISL init", "ISL from base", "self-trained")


@dataclass(frozen=True)
class FewShotBudget:
    steps: int = 16  # optimiser steps per fine-tune
    #: AdamW rate of the fine-tunes: Cellpose's 0.005 wrecked the shipped base on one image in 12 steps
    #: here (F1 0.69 -> 0.44 on the synthetic test fields); 0.001 kept it (0.69).
    learning_rate: float = 0.001
    bsize: int = 96
    batch_size: int = 4
    isl_epochs: int = 5
    self_train_epochs: int = 25
    n_pretext: int = 12
    n_test: int = 4
    size: int = 128
    seeds: tuple[int, ...] = (0, 1)
    counts: tuple[int, ...] = COUNTS

    @classmethod
    def small(cls) -> FewShotBudget:
        return cls(
            steps=2,
            bsize=64,
            batch_size=2,
            isl_epochs=1,
            self_train_epochs=2,
            n_pretext=2,
            n_test=2,
            size=96,
            seeds=(0,),
            counts=(0, 1, 2),
        )


@dataclass
class FewShotTask:
    name: str
    pool_images: list[np.ndarray]  # what the segmentation model sees
    pool_masks: list[np.ndarray]
    pool_stain: list[np.ndarray]  # the nuclear channel (markers)
    test_images: list[np.ndarray]
    test_masks: list[np.ndarray]
    test_stain: list[np.ndarray]
    pretext_sources: list[np.ndarray]
    pretext_targets: list[np.ndarray]
    isl_diameter: float | None
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _crop(image: np.ndarray, size: int) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image)[:size, :size])


def synthetic_task(budget: FewShotBudget, reporter_index: int = 2, stain_index: int = 1) -> FewShotTask:
    from app.science.classical import estimate_diameter
    from app.science.synthetic import make_plate

    pool = make_plate(max(budget.counts), size=budget.size, seed=200)
    test = make_plate(budget.n_test, size=budget.size, seed=300)
    pretext = make_plate(budget.n_pretext, size=budget.size, seed=100)
    sources = [channel for f in pretext for k, channel in enumerate(f.image) if k != stain_index]
    targets = [f.image[stain_index] for f in pretext for k in range(len(f.image)) if k != stain_index]
    diameter = float(np.median([estimate_diameter(f.image[stain_index]) for f in pretext]))
    return FewShotTask(
        name="synthetic plates (nuclei from the translocating reporter)",
        pool_images=[f.image[reporter_index] for f in pool],
        pool_masks=[f.nuclei for f in pool],
        pool_stain=[f.image[stain_index] for f in pool],
        test_images=[f.image[reporter_index] for f in test],
        test_masks=[f.nuclei for f in test],
        test_stain=[f.image[stain_index] for f in test],
        pretext_sources=sources,
        pretext_targets=targets,
        isl_diameter=diameter,
        notes=f"pool seed 200, test seed 300 ({budget.n_test} fields), pretext seed 100 "
        f"({len(sources)} reporter->stain pairs), {budget.size}px fields",
    )


def degraded_view(stain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A dim, blurred, unevenly lit, noisy view of a stain image: the ISL pretext input on DSB2018."""
    from scipy import ndimage as ndi

    from app.science.classical import normalise01

    image = ndi.gaussian_filter(normalise01(stain), rng.uniform(1.5, 2.5))
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]] / max(image.shape)
    light = 1.0 - 0.4 * ((yy - rng.uniform()) ** 2 + (xx - rng.uniform()) ** 2)
    photons = rng.poisson(np.maximum(image * light * 20.0 + 2.0, 0)).astype(np.float32)
    return photons + rng.normal(0, 1.5, image.shape).astype(np.float32)


def _zoomed(image: np.ndarray, zoom: float, nearest: bool = False) -> np.ndarray:
    import cv2

    size = (max(16, round(image.shape[1] * zoom)), max(16, round(image.shape[0] * zoom)))
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(np.asarray(image, np.float32), size, interpolation=interpolation)


def dsb_task(budget: FewShotBudget, data_root: Path | None = None) -> FewShotTask:
    from app.science.classical import estimate_diameter
    from app.science.pretrain import default_dsb_dir, load_annotated_dir
    from models_zoo.registry import shipped_base_models

    root = Path(data_root) if data_root else default_dsb_dir().parent
    if not (root / "dsb2018_fluo").is_dir():  # a git worktree sits one level deeper than the checkout
        root = Path(__file__).resolve().parents[4] / "shared" / "data"
    held_out = set(shipped_base_models()[0].card["training"]["test_images"])
    base_data = load_annotated_dir(root / "dsb2018_fluo")
    # A crop without any nucleus would be segmented at a clamped 5-px diameter (a 6x zoom) and flood the
    # pooled scores with false positives: only crops that hold nuclei are test images.
    test_idx = [
        i
        for i, name in enumerate(base_data.names)
        if name in held_out and _crop(base_data.masks[i], budget.size).max() > 0
    ][: budget.n_test]
    more = load_annotated_dir(root / "dsb2018_fluo_more")
    order = np.random.default_rng(2018).permutation(len(more))
    pool_idx = [int(i) for i in order[: max(budget.counts)]]
    pretext_idx = [int(i) for i in order[max(budget.counts) : max(budget.counts) + budget.n_pretext]]
    rng = np.random.default_rng(7)
    sources, targets = [], []
    for i in pretext_idx:  # masks of these images are never read
        stain = np.asarray(more.images[i], np.float32)
        stain = _zoomed(stain, 30.0 / estimate_diameter(stain))
        stain = _crop(stain, budget.size * 2)
        sources.append(degraded_view(stain, rng))
        targets.append(stain)
    size = budget.size
    pool_images = [_crop(more.images[i], size).astype(np.float32) for i in pool_idx]
    test_images = [_crop(base_data.images[i], size).astype(np.float32) for i in test_idx]
    return FewShotTask(
        name="DSB2018 nuclei (real fluorescence stain)",
        pool_images=pool_images,
        pool_masks=[_relabel(_crop(more.masks[i], size)) for i in pool_idx],
        pool_stain=pool_images,
        test_images=test_images,
        test_masks=[_relabel(_crop(base_data.masks[i], size)) for i in test_idx],
        test_stain=test_images,
        pretext_sources=sources,
        pretext_targets=targets,
        isl_diameter=None,
        notes=f"pool: {len(pool_idx)} dsb2018_fluo_more images; test: {len(test_idx)} of the shipped base's "
        f"held-out images; pretext: {len(sources)} other dsb2018_fluo_more images (no masks), degraded "
        f"view -> stain; top-left {size}px crops",
    )


def _relabel(mask: np.ndarray) -> np.ndarray:
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(np.asarray(mask, np.int32))[0].astype(np.int32)


def _finetune(init, images, masks, budget: FewShotBudget, seed: int):
    from app.science.training import TrainingConfig, finetune

    keep = [i for i, m in enumerate(masks) if int(np.asarray(m).max()) > 0]
    images, masks = [images[i] for i in keep], [masks[i] for i in keep]
    if not images:
        return None
    repeat = max(1, math.ceil(budget.batch_size / len(images)))
    images, masks = list(images) * repeat, list(masks) * repeat
    epochs = max(1, round(budget.steps * budget.batch_size / len(images)))
    config = TrainingConfig(
        max_epochs=epochs,
        min_epochs=epochs,
        patience=10_000,
        batch_size=budget.batch_size,
        bsize=budget.bsize,
        warmup_epochs=min(2, epochs - 1),
        min_train_masks=1,
        seed=seed,
        learning_rate=budget.learning_rate,
    )
    return finetune(init, images, masks, [], [], config).net


def _score_net(net, task: FewShotTask) -> tuple[float, float]:
    from app.science.training import evaluate_model, image_diameters

    if net is None:
        return math.nan, math.nan
    scores = evaluate_model(
        net, task.test_images, task.test_masks, list(image_diameters(task.test_masks)), tile=False
    ).scores
    return float(scores.f1), float(scores.map_50_95)


def _score(true: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> tuple[float, float]:
    from app.science.metrics import score_set

    scores = score_set([np.asarray(t) for t in true], [np.asarray(p) for p in pred])
    return float(scores.f1), float(scores.map_50_95)


def _self_train_labels(stains: Sequence[np.ndarray], budget: FewShotBudget, seed: int, per_image_zoom: bool):
    """Pseudo-labels (and the markers used) for stain images; DSB images are size-normalised first."""
    from app.science.classical import estimate_diameter
    from app.science.self_training import SelfTrainConfig, self_train

    config = SelfTrainConfig(epochs=budget.self_train_epochs, seed=seed)
    if not per_image_zoom:
        result = self_train(stains, config=config)
        return result.labels, result.markers, [1.0] * len(stains)
    # DSB2018 mixes magnifications: bring nuclei to ~SELF_TRAIN_DIAMETER px (zoom capped: cost grows as zoom^2).
    zooms = [float(np.clip(SELF_TRAIN_DIAMETER / estimate_diameter(s), 0.5, 2.0)) for s in stains]
    zoomed = [_zoomed(s, z) for s, z in zip(stains, zooms)]
    result = self_train(zoomed, diameter=SELF_TRAIN_DIAMETER, config=config)
    labels = [
        _zoomed(lab, 1.0 / z, nearest=True)[: s.shape[0], : s.shape[1]].astype(np.int32)
        for lab, z, s in zip(result.labels, zooms, stains)
    ]
    labels = [_pad_to(lab, s.shape) for lab, s in zip(labels, stains)]
    return labels, result.markers, zooms


def _pad_to(labels: np.ndarray, shape) -> np.ndarray:
    out = np.zeros(shape, np.int32)
    out[: labels.shape[0], : labels.shape[1]] = labels[: shape[0], : shape[1]]
    return out


def _classical(stains, markers, zooms) -> list[np.ndarray]:
    from app.science.classical import classical_segment

    out = []
    for stain, marker, zoom in zip(stains, markers, zooms):
        labels = classical_segment(_zoomed(stain, zoom) if zoom != 1.0 else stain, marker)
        if zoom != 1.0:
            labels = _pad_to(_zoomed(labels, 1.0 / zoom, nearest=True).astype(np.int32), stain.shape)
        out.append(labels)
    return out


def run_task(task: FewShotTask, budget: FewShotBudget, echo: Callable[[str], None] = print) -> dict:
    import torch

    from app.science.backbone import HALF_WIDTHS, build_network
    from app.science.isl import ISLConfig, pretrain_isl
    from app.science.weights import load_model
    from models_zoo.registry import shipped_base_models

    entry = shipped_base_models()[0]
    base, _ = load_model(entry.weights_path, expected_sha256=entry.weights_sha256)
    per_image_zoom = task.isl_diameter is None
    echo(f"\n== {task.name}\n   {task.notes}")
    started = time.perf_counter()
    # ISL pretext: once per dataset (the pretext uses no annotation; its seed is the benchmark's first).
    n_val = max(1, len(task.pretext_sources) // 6)
    isl_config = ISLConfig(
        bsize=budget.bsize,
        batch_size=budget.batch_size,
        max_epochs=budget.isl_epochs,
        min_epochs=1,
        patience=3,
        crops_per_pair=1,
        seed=0,
    )
    pretext = (
        task.pretext_sources[n_val:],
        task.pretext_targets[n_val:],
        task.pretext_sources[:n_val],
        task.pretext_targets[:n_val],
    )
    isl = pretrain_isl(*pretext, isl_config, widths=HALF_WIDTHS, diameter=task.isl_diameter)
    isl_base = pretrain_isl(*pretext, isl_config, init_net=base, diameter=task.isl_diameter)
    for what, res in (("ISL pretext from random", isl), ("ISL pretext from base", isl_base)):
        echo(
            f"   {what}: {res.n_train} pairs, {len(res.history)} epochs, best val L1 {res.best_val_loss:.3f}, "
            f"val correlation {res.val_correlation:.3f} ({time.perf_counter() - started:.0f}s)"
        )
    rows: dict[str, dict[int, list[tuple[float, float]]]] = {}

    def add(line: str, n: int, value: tuple[float, float]) -> None:
        rows.setdefault(line, {}).setdefault(n, []).append(value)

    for seed in budget.seeds:
        torch.manual_seed(seed)
        random_init = build_network(HALF_WIDTHS)
        order = np.random.default_rng(seed).permutation(len(task.pool_images))
        pseudo, _markers, _zooms = _self_train_labels(task.pool_stain, budget, seed, per_image_zoom)
        self_trained = _finetune(base, task.pool_images, pseudo, budget, seed)
        test_pseudo, test_markers, test_zooms = _self_train_labels(task.test_stain, budget, seed, per_image_zoom)
        add("cellcutter (stain)", 0, _score(task.test_masks, test_pseudo))
        add("classical", 0, _score(task.test_masks, _classical(task.test_stain, test_markers, test_zooms)))
        add("pseudo-labels (pool)", 0, _score(task.pool_masks, pseudo))
        add("shipped base", 0, _score_net(base, task))
        add("self-trained", 0, _score_net(self_trained, task))
        for n in budget.counts:
            if n == 0:
                continue
            chosen = [int(i) for i in order[:n]]
            images = [task.pool_images[i] for i in chosen]
            masks = [task.pool_masks[i] for i in chosen]
            for line, init in (
                ("random", random_init),
                ("shipped base", base),
                ("ISL init", isl.net),
                ("ISL from base", isl_base.net),
                ("self-trained", self_trained),
            ):
                if init is None:
                    continue
                add(line, n, _score_net(_finetune(init, images, masks, budget, seed), task))
            echo(
                f"   seed {seed} n={n}: "
                + ", ".join(f"{line} F1 {rows[line][n][-1][0]:.3f}" for line in LINES if n in rows.get(line, {}))
                + f" ({time.perf_counter() - started:.0f}s)"
            )
        echo(
            f"   seed {seed} n=0: "
            + ", ".join(f"{line} F1 {values[0][-1][0]:.3f}" for line, values in rows.items() if 0 in values)
        )
    return {
        "task": task.name,
        "notes": task.notes,
        "rows": rows,
        "isl": {
            name: {"best_val_l1": r.best_val_loss, "val_correlation": r.val_correlation, "epochs": len(r.history)}
            for name, r in (("random", isl), ("base", isl_base))
        },
        "seconds": time.perf_counter() - started,
    }


def format_table(result: dict, counts: Sequence[int]) -> list[str]:
    """Markdown rows: line x n, 'F1 mean [min-max] / mAP mean'."""
    lines = ["| line | " + " | ".join(f"n={n}" for n in counts) + " |", "|---" * (len(counts) + 1) + "|"]
    for line, by_n in result["rows"].items():
        cells = []
        for n in counts:
            values = by_n.get(n)
            if not values:
                cells.append("—")
                continue
            f1 = np.array([v[0] for v in values])
            ap = np.array([v[1] for v in values])
            interval = f" [{f1.min():.2f}–{f1.max():.2f}]" if len(values) > 1 else ""
            cells.append(f"{np.nanmean(f1):.3f}{interval} / {np.nanmean(ap):.3f}")
        lines.append(f"| {line} | " + " | ".join(cells) + " |")
    return lines


def run_few_shot_benchmark(
    *,
    small: bool = False,
    datasets: Sequence[str] = ("synthetic", "dsb2018"),
    budget: FewShotBudget | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Run the benchmark, print one table per dataset (F1 mean [min–max over seeds] / mAP .5:.95)."""
    import torch

    budget = budget or (FewShotBudget.small() if small else FewShotBudget())
    torch.set_num_threads(max(1, torch.get_num_threads()))
    echo(f"few-shot benchmark: {budget}")
    results = {}
    for name in datasets:
        task = synthetic_task(budget) if name == "synthetic" else dsb_task(budget)
        results[name] = run_task(task, budget, echo)
        echo("")
        for row in format_table(results[name], budget.counts):
            echo(row)
        echo(f"({results[name]['seconds']:.0f}s)")
    return {"budget": budget.__dict__, "results": results}
