"""Zero-shot benchmark: a shipped base model on held-out DSB2018 nuclei at several image scales.

Each held-out image (and its masks, nearest-neighbour) is rescaled by 0.5x ... 2x and segmented by
the base model with three diameters: the one its size model estimates (Cellpose 3's two passes:
style regression, then the median mask diameter at that estimate), the model's default (the card's
training diameter, what a request without a diameter got before size models) and each image's
true diameter (the median equivalent-circle diameter of its masks, an upper reference).

Scores are pooled F1 at IoU 0.5 (TP, FP, FN summed over images) with a 95 % percentile interval
from a bootstrap over images (resampling whole images keeps the pooling). ``zero_shot_rows``
returns plain dict rows so that other benchmarks (``cellfuse bench quality``) can reuse them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

#: The scales of the issue's target (pooled F1 >= 0.90 at each with estimated diameters).
RESCALES: tuple[float, ...] = (0.5, 0.75, 1.0, 1.5, 2.0)
DIAMETER_MODES: tuple[str, ...] = ("estimated", "default", "true")


def pooled_f1(counts: np.ndarray) -> float:
    """F1 from summed (TP, FP, FN) rows: 2 TP / (2 TP + FP + FN); 1.0 when there is nothing at all."""
    tp, fp, fn = np.asarray(counts, np.float64).reshape(-1, 3).sum(axis=0)
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 1.0


def bootstrap_interval(
    counts: np.ndarray, *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval of pooled F1 over images resampled with replacement.

    >>> counts = np.array([[9, 1, 0], [8, 0, 2], [10, 1, 1]])
    >>> low, high = bootstrap_interval(counts, n_boot=500)
    >>> bool(low <= pooled_f1(counts) <= high)
    True
    """
    counts = np.asarray(counts, np.float64).reshape(-1, 3)
    if len(counts) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(counts), size=(n_boot, len(counts)))
    sums = counts[picks].sum(axis=1)  # (n_boot, 3)
    tp, fp, fn = sums[:, 0], sums[:, 1], sums[:, 2]
    denominator = 2 * tp + fp + fn
    f1 = np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1e-12), 1.0)
    alpha = (1 - level) / 2
    return float(np.quantile(f1, alpha)), float(np.quantile(f1, 1 - alpha))


def zero_shot_rows(
    net,
    size_model,
    images: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    *,
    rescales: Sequence[float] = RESCALES,
    modes: Sequence[str] = DIAMETER_MODES,
    default_diameter: float | None = None,
    flow_threshold: float = 0.4,
    cellprob_threshold: float = 0.0,
    tile: bool = False,
    n_boot: int = 2000,
    seed: int = 0,
    with_scores: bool = False,
    recentre_iterations: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> list[dict]:
    """One row per (rescale, diameter mode): pooled F1@0.5, its bootstrap interval, counts and the
    diameters used. ``size_model`` is a ``size_model.SizeModel`` (needed for mode "estimated").
    ``with_scores`` adds every pooled score (mAP, Jaccard, ...) as ``row["scores"]``."""
    from app.science.backbone import masks_from_maps, predict_maps
    from app.science.metrics import match, score_set
    from app.science.pretrain import rescale_annotated
    from app.science.training import RECENTRE_ITERATIONS, estimate_image_diameter, image_diameters

    unknown = set(modes) - set(DIAMETER_MODES)
    if unknown:
        raise ValueError(f"unknown diameter mode(s) {sorted(unknown)}; choose from {DIAMETER_MODES}")
    if recentre_iterations is None:
        recentre_iterations = RECENTRE_ITERATIONS
    if "estimated" in modes and size_model is None:
        raise ValueError("the model has no size model: mode 'estimated' needs one")
    diam_mean = float(net.diam_mean.item())
    if default_diameter is None:
        default_diameter = float(net.diam_labels.item())
    net.eval()
    rows = []
    for rescale in rescales:
        scaled = [
            rescale_annotated(im, m, rescale) if rescale != 1 else (np.asarray(im, np.float32), np.asarray(m))
            for im, m in zip(images, masks)
        ]
        true_diameters = image_diameters([m for _, m in scaled])
        for mode in modes:
            started = time.perf_counter()
            counts, used, ratios, preds = [], [], [], []
            for (image, truth), true_diameter in zip(scaled, true_diameters):
                if mode == "estimated":
                    estimate = estimate_image_diameter(
                        net,
                        size_model,
                        image,
                        flow_threshold=flow_threshold,
                        cellprob_threshold=cellprob_threshold,
                        tile=tile,
                        recentre_iterations=recentre_iterations,
                    )
                    diameter = estimate.diameter
                elif mode == "default":
                    diameter = default_diameter
                else:
                    diameter = float(true_diameter)
                maps = predict_maps(net, image, diameter=diameter, tile=tile)
                pred = masks_from_maps(
                    maps,
                    diameter=diameter,
                    diam_mean=diam_mean,
                    flow_threshold=flow_threshold,
                    cellprob_threshold=cellprob_threshold,
                )
                m = match(truth, pred)
                counts.append((m.tp, m.fp, m.fn))
                preds.append(pred)
                used.append(diameter)
                ratios.append(diameter / float(true_diameter))
            counts_arr = np.asarray(counts)
            low, high = bootstrap_interval(counts_arr, n_boot=n_boot, seed=seed)
            tp, fp, fn = (int(v) for v in counts_arr.sum(axis=0))
            log_ratio = np.abs(np.log(np.asarray(ratios)))
            row = {
                "rescale": float(rescale),
                "diameter": mode,
                "f1": round(pooled_f1(counts_arr), 4),
                "ci_low": round(low, 4),
                "ci_high": round(high, 4),
                "n_images": len(scaled),
                "tp": tp,
                "fp": fp,
                "fn": fn,
                "median_diameter": round(float(np.median(used)), 2),
                "median_true_diameter": round(float(np.median(true_diameters)), 2),
                "median_abs_log_ratio": round(float(np.median(log_ratio)), 3),
                "seconds": round(time.perf_counter() - started, 1),
                "scores": score_set([t for _, t in scaled], preds).as_dict() if with_scores else None,
            }
            rows.append(row)
            if echo is not None:
                echo(format_row(row))
    return rows


def format_row(row: dict) -> str:
    return (
        f"{row['rescale']:>5.2f}x  {row['diameter']:<9}  F1 {row['f1']:.3f} [{row['ci_low']:.3f}, "
        f"{row['ci_high']:.3f}]  TP/FP/FN {row['tp']}/{row['fp']}/{row['fn']}  diameter {row['median_diameter']:.1f}"
        f" (true {row['median_true_diameter']:.1f}, |log ratio| {row['median_abs_log_ratio']:.2f})"
        f"  {row['seconds']:.0f}s"
    )


def load_heldout(card: dict, data_dirs: Sequence[str | Path] | None = None, limit: int | None = None):
    """The held-out DSB2018 images named on a base card (``training.test_images``)."""
    from app.science.pretrain import default_dsb_dirs, load_annotated_dirs

    names = list((card.get("training") or {}).get("test_images") or [])
    if not names:
        raise ValueError(f"the card of {card.get('name')}:{card.get('version')} names no held-out images")
    data = load_annotated_dirs(list(data_dirs) if data_dirs else default_dsb_dirs())
    index = {n: i for i, n in enumerate(data.names)}
    missing = [n for n in names if n not in index]
    if missing:
        raise ValueError(f"{len(missing)} held-out image(s) are not in the data folders, e.g. {missing[:2]}")
    picked = [index[n] for n in names][: limit or None]
    return data.subset(picked)


def run_zero_shot_benchmark(
    *,
    model: str = "",
    data_dirs: Sequence[str | Path] | None = None,
    rescales: Sequence[float] = RESCALES,
    modes: Sequence[str] = DIAMETER_MODES,
    limit: int | None = None,
    n_boot: int = 2000,
    recentre_iterations: int | None = None,
    echo: Callable[[str], None] = print,
) -> list[dict]:
    """Load a shipped base (newest by default), its held-out split and size model, print the table."""
    import torch

    from app.science.size_model import SizeModel
    from app.science.weights import load_model
    from models_zoo.registry import shipped_base_models

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    entries = shipped_base_models()
    if not entries:
        raise ValueError("no shipped base model in models_zoo/")
    entry = next((e for e in entries if e.name == model), None) if model else entries[-1]
    if entry is None:
        raise ValueError(f"no shipped base model {model!r}; shipped: {[e.name for e in entries]}")
    net, card = load_model(entry.weights_path)
    size_model = SizeModel.from_dict(card.size_model) if card.size_model else None
    held = load_heldout(entry.card, data_dirs, limit)
    stored = card.thresholds or {}
    flow_threshold = float(stored.get("flow_threshold", 0.4))
    cellprob_threshold = float(stored.get("cellprob_threshold", 0.0))
    echo(
        f"zero-shot: {entry.name} on {len(held)} held-out DSB2018 images, rescaled {list(rescales)};"
        f" default diameter {card.diameter:.1f}; thresholds flow {flow_threshold} / cell probability"
        f" {cellprob_threshold} ({'the card' if stored else 'Cellpose'}'s); pooled F1@0.5 with a 95 % bootstrap"
        " interval over images"
    )
    return zero_shot_rows(
        net,
        size_model,
        list(held.images),
        list(held.masks),
        rescales=rescales,
        modes=modes,
        default_diameter=card.diameter,
        flow_threshold=flow_threshold,
        cellprob_threshold=cellprob_threshold,
        n_boot=n_boot,
        recentre_iterations=recentre_iterations,
        echo=echo,
    )
