"""The microscopy-augmentation ablation: fine-tune the same reporter model with and without the
photometric augmentations (noise, salt-and-pepper, brightness), then score both on a plate imaged
differently (dimmer, noisier, blurrier, more vignetting) than the training plate.

Geometric augmentation stays on in both arms, so the difference is the photometric group alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

#: The acquisition the models never see in training: a quarter of the photons, more read noise,
#: a softer focus and stronger vignetting.
SHIFTED_IMAGING_CHANGES: dict[str, Any] = dict(
    exposure=(0.12, 0.3), read_noise=12.0, psf_sigma=(1.8, 2.6), vignetting=(0.5, 0.7), haze=(0.3, 0.5)
)


def run_ablation_benchmark(
    *,
    reporter_index: int = 2,
    obj: str = "nuclei",
    n_train: int = 12,
    n_val: int = 4,
    n_test: int = 8,
    size: int = 192,
    max_epochs: int = 30,
    seeds: tuple[int, ...] = (0, 1),
    echo: Callable[[str], None] = print,
) -> dict:
    import torch

    from app.science.synthetic import DEFAULT_IMAGING, DEFAULT_REPORTERS, make_plate
    from app.science.training import TrainingConfig, evaluate_model, finetune
    from app.science.weights import load_model
    from models_zoo.registry import shipped_base_models

    torch.set_num_threads(max(1, torch.get_num_threads()))
    reporter = DEFAULT_REPORTERS[reporter_index]
    train_plate = make_plate(n_train + n_val, size=size, seed=11, reporters=[reporter])
    same_plate = make_plate(n_test, size=size, seed=12, reporters=[reporter])
    shifted = replace(DEFAULT_IMAGING, **SHIFTED_IMAGING_CHANGES)
    shifted_plate = make_plate(n_test, size=size, seed=12, reporters=[reporter], imaging=shifted)

    def pairs(fields):
        return [f.image[0] for f in fields], [f.nuclei if obj == "nuclei" else f.cells for f in fields]

    train_images, train_masks = pairs(train_plate[:n_train])
    val_images, val_masks = pairs(train_plate[n_train:])
    base_entry = shipped_base_models()[0]
    base, _card = load_model(base_entry.weights_path, expected_sha256=base_entry.weights_sha256)
    echo(
        f"ablation: reporter {reporter.name} ({reporter.localisation}) → {obj}; base {base_entry.name}; "
        f"{n_train} train / {n_val} val fields; {n_test} test fields on the training acquisition and on a "
        f"shifted one ({SHIFTED_IMAGING_CHANGES})"
    )
    results: dict[str, dict[str, list[float]]] = {}
    for arm, microscopy in (("with microscopy augmentations", True), ("geometry only", False)):
        scores: dict[str, list[float]] = {"same": [], "shifted": []}
        for seed in seeds:
            config = TrainingConfig(
                max_epochs=max_epochs, min_epochs=10, patience=8, bsize=128, seed=seed, microscopy_augment=microscopy
            )
            result = finetune(base, train_images, train_masks, val_images, val_masks, config)
            for name, plate in (("same", same_plate), ("shifted", shifted_plate)):
                images, masks = pairs(plate)
                f1 = evaluate_model(result.net, images, masks, result.diameter, tile=False).scores.f1
                scores[name].append(float(f1))
            echo(
                f"  {arm:32s} seed {seed}: F1 same acquisition {scores['same'][-1]:.3f}, "
                f"shifted {scores['shifted'][-1]:.3f} (best epoch {result.best_epoch})"
            )
        results[arm] = scores
    summary = {arm: {k: float(np.mean(v)) for k, v in s.items()} for arm, s in results.items()}
    for arm, s in summary.items():
        echo(f"{arm:34s} mean F1: same {s['same']:.3f}  shifted {s['shifted']:.3f}")
    gain = summary["with microscopy augmentations"]["shifted"] - summary["geometry only"]["shifted"]
    echo(f"F1 gain on the shifted acquisition from microscopy augmentations: {gain:+.3f}")
    return {"arms": results, "summary": summary, "shifted_gain": gain}
