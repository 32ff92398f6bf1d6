"""`cellfuse bench quality`: does Flow Fusion beat its best channel, the label-fusion baselines and a
joint K-channel model, in every regime? One reproducible table from shipped data only.

For each regime of ``synthetic.REGIMES`` (one strong reporter + weak ones, all weak, one channel
blind to the cells, and a dimmer/shifted test acquisition) a synthetic plate is built on the shipped
real nucleus masks and split into train / validation / test fields. From the shipped base:

- one model per reporter is fine-tuned on the training fields (early stopping on validation loss);
- the **joint** baseline, one CPnet taking all K reporters (``backbone.joint_network``), is
  fine-tuned on the same fields with the same schedule.

Every regime's plate has the same seed, so its fields hold the same cells (masks) and imaging
draws; only the reporters differ. A reporter that appears in several regimes is fine-tuned once
(on the same training masks) and its model reused, as the zoo reuses a reporter's model across
panels; each regime's joint model is trained on that regime's own training fields.

On the validation fields only: the learned fusion is fitted (``fusion_fitting``: weights,
thresholds, confidence, by leave-one-field-out CV), and every single model (each channel alone, the
joint model) gets its best flow / cell-probability thresholds from the same grid. The label-fusion
baselines fuse the per-channel masks made at those per-channel thresholds.

On the test fields, never tuned on, every row is scored: pooled F1 at IoU 0.5 with a 95 %
bootstrap interval over fields. The shifted regime reuses the strong+weak models and fits (trained
and tuned on the normal acquisition) and tests on fields imaged differently.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class QualitySize:
    n_train: int
    n_val: int
    n_test: int
    field_size: int
    training: dict
    n_boot: int = 2000


#: 8 fine-tunes (5 distinct reporters, 3 joint models), short: sized for 2 busy CPU cores.
FULL = QualitySize(
    n_train=8,
    n_val=6,
    n_test=10,
    field_size=128,
    training={"max_epochs": 16, "min_epochs": 6, "patience": 5, "batch_size": 8, "bsize": 96, "val_crops_per_image": 1},
)
#: A smoke test: everything runs, the numbers mean little.
SMALL = QualitySize(
    n_train=3,
    n_val=2,
    n_test=2,
    field_size=96,
    training={"max_epochs": 1, "min_epochs": 0, "patience": 1, "batch_size": 4, "bsize": 64},
    n_boot=200,
)

LABEL_METHODS = ("staple", "simple", "voting", "majority_voting")


@dataclass
class _Trained:
    names: list[str]
    nets: list
    diameters: list[float]
    joint: Any
    joint_diameter: float
    diam_mean: float
    fusion: Any  # flow_fusion.FusionParameters
    single_thresholds: list  # fusion_fitting.ThresholdFit per channel
    joint_thresholds: Any  # fusion_fitting.ThresholdFit
    val_fields: list
    seconds: dict


def _truth(field, obj: str) -> np.ndarray:
    return field.nuclei if obj == "nuclei" else field.cells


def _train_regime(regime, size: QualitySize, obj: str, seed: int, echo, reporter_models: dict) -> _Trained:
    from app.science.backbone import (
        joint_network,
        predict_maps_joint,
        predict_maps_multi,
    )
    from app.science.fusion_fitting import fit_fusion_parameters, fit_thresholds
    from app.science.synthetic import make_plate
    from app.science.training import TrainingConfig, finetune
    from app.science.weights import load_model
    from models_zoo.registry import shipped_base_models

    entry = shipped_base_models()[0]
    base, _card = load_model(entry.weights_path, expected_sha256=entry.weights_sha256)
    plate = make_plate(size.n_train + size.n_val, size=size.field_size, seed=seed, reporters=regime.reporters)
    train, val = plate[: size.n_train], plate[size.n_train :]
    names = list(plate[0].channel_names)
    config = TrainingConfig(**size.training, seed=seed)
    seconds: dict[str, float] = {}
    nets, diameters = [], []
    tic = time.perf_counter()
    for k, (name, spec) in enumerate(zip(names, regime.reporters)):
        if spec not in reporter_models:
            result = finetune(
                base,
                [f.image[k] for f in train],
                [_truth(f, obj) for f in train],
                [f.image[k] for f in val],
                [_truth(f, obj) for f in val],
                config,
            )
            reporter_models[spec] = (result.net, float(result.diameter))
            echo(
                f"  fine-tuned {name}: best epoch {result.best_epoch}, {result.stop_reason}, "
                f"{time.perf_counter() - tic:.0f} s"
            )
        else:
            echo(f"  {name}: the model fine-tuned for an earlier regime (same reporter, same training masks)")
        nets.append(reporter_models[spec][0])
        diameters.append(reporter_models[spec][1])
    seconds["per-channel fine-tunes"] = time.perf_counter() - tic
    tic = time.perf_counter()
    joint_result = finetune(
        joint_network(base, len(names)),
        [f.image for f in train],
        [_truth(f, obj) for f in train],
        [f.image for f in val],
        [_truth(f, obj) for f in val],
        config,
        joint=True,
    )
    seconds["joint fine-tune"] = time.perf_counter() - tic
    echo(
        f"  fine-tuned the joint {len(names)}-channel model: best epoch {joint_result.best_epoch}, "
        f"{seconds['joint fine-tune']:.0f} s"
    )

    tic = time.perf_counter()
    diam_mean = float(base.diam_mean.item())
    diameter = float(np.mean(diameters))
    truths = [_truth(f, obj) for f in val]
    val_maps = [predict_maps_multi(nets, f.image, diameter=diameters) for f in val]
    fusion = fit_fusion_parameters(
        val_maps, truths, names, diameter=diameter, diam_mean=diam_mean, n_boot=size.n_boot, seed=seed
    )
    singles = [
        fit_thresholds([m[k] for m in val_maps], truths, diameter=diameters[k], diam_mean=diam_mean)
        for k in range(len(names))
    ]
    joint_val = [predict_maps_joint(joint_result.net, f.image, diameter=joint_result.diameter) for f in val]
    joint_thresholds = fit_thresholds(joint_val, truths, diameter=joint_result.diameter, diam_mean=diam_mean)
    seconds["fitting on validation"] = time.perf_counter() - tic
    weights = ", ".join(f"{n} {w:.2f}" for n, w in zip(names, fusion.weights_for(names)))
    echo(
        f"  learned fusion: {fusion.method}, weights {weights}, confidence {fusion.confidence}, flow threshold "
        f"{fusion.flow_threshold}, cellprob threshold {fusion.cellprob_threshold}; CV F1 "
        f"{_f(fusion.cv_f1)} {_interval(fusion.cv_interval)} over {fusion.n_fields} validation fields"
    )
    return _Trained(
        names,
        nets,
        diameters,
        joint_result.net,
        float(joint_result.diameter),
        diam_mean,
        fusion,
        singles,
        joint_thresholds,
        val,
        seconds,
    )


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _interval(bounds) -> str:
    return "" if bounds is None else f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"


def _score_rows(trained: _Trained, fields: Sequence, obj: str) -> dict[str, np.ndarray]:
    """Per-field (tp, fp, fn) counts of every row on the test fields."""
    from app.science.backbone import (
        masks_from_maps,
        predict_maps_joint,
        predict_maps_multi,
    )
    from app.science.flow_fusion import FUSED_FLOW_THRESHOLD, fuse_maps
    from app.science.fusion_fitting import field_counts
    from app.science.label_fusion import fuse_labels

    fusion, names = trained.fusion, trained.names
    diameter = float(np.mean(trained.diameters))
    rows: dict[str, list[tuple[int, int, int]]] = {}

    def add(row: str, truth: np.ndarray, labels: np.ndarray) -> None:
        rows.setdefault(row, []).append(field_counts(truth, labels))

    for field in fields:
        truth = _truth(field, obj)
        maps = [m.maps for m in predict_maps_multi(trained.nets, field.image, diameter=trained.diameters)]
        learned = fuse_maps(maps, fusion.weights_for(names), fusion.confidence)
        add(
            "Flow Fusion, learned",
            truth,
            masks_from_maps(
                learned,
                diameter=diameter,
                diam_mean=trained.diam_mean,
                flow_threshold=fusion.flow_threshold,
                cellprob_threshold=fusion.cellprob_threshold,
            ),
        )
        add(
            "Flow Fusion, equal weights (0.7)",
            truth,
            masks_from_maps(
                fuse_maps(maps), diameter=diameter, diam_mean=trained.diam_mean, flow_threshold=FUSED_FLOW_THRESHOLD
            ),
        )
        channel_labels = []
        for k, name in enumerate(names):
            fit = trained.single_thresholds[k]
            labels = masks_from_maps(
                maps[k],
                diameter=trained.diameters[k],
                diam_mean=trained.diam_mean,
                flow_threshold=fit.flow_threshold,
                cellprob_threshold=fit.cellprob_threshold,
            )
            channel_labels.append(labels)
            add(f"{name} alone", truth, labels)
        for method in LABEL_METHODS:
            add(method, truth, fuse_labels(channel_labels, method, min_size=15))
        joint_maps = predict_maps_joint(trained.joint, field.image, diameter=trained.joint_diameter)
        jt = trained.joint_thresholds
        add(
            f"joint {len(names)}-channel model",
            truth,
            masks_from_maps(
                joint_maps,
                diameter=trained.joint_diameter,
                diam_mean=trained.diam_mean,
                flow_threshold=jt.flow_threshold,
                cellprob_threshold=jt.cellprob_threshold,
            ),
        )
    return {row: np.asarray(counts) for row, counts in rows.items()}


def _summarise(counts: dict[str, np.ndarray], names: list[str], n_boot: int, seed: int) -> dict:
    from app.science.fusion_fitting import bootstrap_f1, interval, pooled_f1

    table: dict[str, dict[str, Any]] = {}
    for row, c in counts.items():
        samples = bootstrap_f1(c, n_boot=n_boot, seed=seed)
        table[row] = {
            "f1": float(pooled_f1(c.sum(axis=0))),
            "interval": interval(samples),
            "tp": int(c[:, 0].sum()),
            "fp": int(c[:, 1].sum()),
            "fn": int(c[:, 2].sum()),
        }
    learned = table["Flow Fusion, learned"]
    best_single = max((f"{n} alone" for n in names), key=lambda r: table[r]["f1"])
    best_label = max(LABEL_METHODS, key=lambda r: table[r]["f1"])
    verdict = {
        "best_single": best_single,
        "learned_minus_best_single": learned["f1"] - table[best_single]["f1"],
        "at_or_above_best_single": learned["f1"] >= table[best_single]["interval"][0],
        "above_every_label_fusion": all(learned["f1"] > table[m]["f1"] for m in LABEL_METHODS),
        "best_label_fusion": best_label,
    }
    return {"rows": table, "verdict": verdict}


def run_quality_benchmark(
    *,
    small: bool = False,
    regimes: Sequence[str] | None = None,
    obj: str = "cells",
    seed: int = 7,
    zero_shot_images: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict:
    """Every regime's table, then the zero-shot rows: the shipped base on its held-out DSB2018
    images rescaled 0.5x-2x, diameters estimated by its size model (and, for reference, the true
    ones). ``zero_shot_images``: how many held-out images (default 16; 2 with ``small``; 0 skips)."""
    import torch

    from app.science.synthetic import REGIMES, make_plate

    size = SMALL if small else FULL
    chosen = list(regimes or REGIMES)
    unknown = [r for r in chosen if r not in REGIMES]
    if unknown:
        raise ValueError(f"unknown regimes {unknown}; valid: {', '.join(REGIMES)}")
    if obj not in ("nuclei", "cells"):
        raise ValueError(f"object must be nuclei or cells, got {obj!r}")
    started = time.perf_counter()
    echo(
        f"quality bench: {obj}, fields {size.field_size} px, {size.n_train} train / {size.n_val} val / "
        f"{size.n_test} test per regime, torch threads {torch.get_num_threads()}, seed {seed}; "
        f"training {size.training}"
    )
    trained_by_reporters: dict[tuple, _Trained] = {}
    reporter_models: dict = {}
    results = {}
    for name in chosen:
        regime = REGIMES[name]
        echo(f"regime {name}: {regime.description}")
        key = tuple(regime.reporters)
        if key not in trained_by_reporters:
            trained_by_reporters[key] = _train_regime(regime, size, obj, seed, echo, reporter_models)
        else:
            echo("  (models and fitted fusion reused from the regime with the same reporters)")
        trained = trained_by_reporters[key]
        # Test fields: a different plate seed from training/validation, in the regime's own acquisition.
        test = make_plate(
            size.n_test, size=size.field_size, seed=seed + 1000, reporters=regime.reporters, imaging=regime.test_imaging
        )
        tic = time.perf_counter()
        counts = _score_rows(trained, test, obj)
        summary = _summarise(counts, trained.names, size.n_boot, seed)
        summary["fusion"] = trained.fusion.to_dict()
        summary["seconds"] = {**trained.seconds, "scoring test fields": time.perf_counter() - tic}
        summary["n_test_fields"] = len(test)
        summary["n_true"] = sum(rows["tp"] + rows["fn"] for rows in [summary["rows"]["Flow Fusion, learned"]])
        results[name] = summary
        _print_regime(name, summary, echo)
    echo("")
    echo("| regime | learned FF | best single | Δ | learned FF ≥ best single (interval) | > every label fusion |")
    echo("|---|---|---|---|---|---|")
    for name, summary in results.items():
        v, rows = summary["verdict"], summary["rows"]
        echo(
            f"| {name} | {rows['Flow Fusion, learned']['f1']:.3f} | {v['best_single']} "
            f"{rows[v['best_single']]['f1']:.3f} | {v['learned_minus_best_single']:+.3f} | "
            f"{'yes' if v['at_or_above_best_single'] else 'NO'} | {'yes' if v['above_every_label_fusion'] else 'NO'} |"
        )
    n_zero_shot = (2 if small else 16) if zero_shot_images is None else zero_shot_images
    zero_shot = _zero_shot_rows(n_zero_shot, small, echo) if n_zero_shot > 0 else None
    echo(f"quality bench finished in {time.perf_counter() - started:.0f} s")
    return {"object": obj, "size": size.__dict__, "seed": seed, "regimes": results, "zero_shot": zero_shot}


def _zero_shot_rows(n_images: int, small: bool, echo) -> list[dict] | None:
    """``benchmarks.zero_shot`` on the shipped base; None (said so) when the DSB2018 images of the
    development checkout are not there (they are not part of the package)."""
    from app.benchmarks.zero_shot import RESCALES, run_zero_shot_benchmark

    echo("")
    echo("### zero-shot: the shipped base, its held-out DSB2018 nuclei, diameters estimated (true for reference)")
    try:
        return run_zero_shot_benchmark(
            rescales=(0.5, 2.0) if small else RESCALES,
            modes=("estimated", "true"),
            limit=n_images,
            n_boot=200 if small else 2000,
            echo=echo,
        )
    except (FileNotFoundError, ValueError) as exc:
        echo(f"zero-shot rows skipped: {exc}")
        return None


def _print_regime(name: str, summary: dict, echo) -> None:
    echo("")
    echo(f"### {name} ({summary['n_test_fields']} test fields, {summary['n_true']} true objects)")
    echo("| method | F1@0.5 | 95% interval (fields) | TP | FP | FN |")
    echo("|---|---|---|---|---|---|")
    for row, r in summary["rows"].items():
        echo(f"| {row} | {r['f1']:.3f} | {_interval(r['interval'])} | {r['tp']} | {r['fp']} | {r['fn']} |")
    fusion = summary["fusion"]
    weights = ", ".join(f"{c} {w:.2f}" for c, w in zip(fusion["channels"], fusion["weights"]))
    echo(
        f"learned fusion (fitted on validation): {fusion['method']}; weights {weights}; confidence "
        f"{fusion['confidence']}; flow {fusion['flow_threshold']}, cellprob {fusion['cellprob_threshold']}"
    )
