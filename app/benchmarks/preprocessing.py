"""Does illumination correction and plate-level normalisation help Flow Fusion? Measured on
synthetic plates imaged like a widefield HCS run: one shading profile shared by every field of a
microscope (vignetting to 40 % at the corners), and a gain that drifts from plate to plate.

Per recipe, one model per reporter is fine-tuned from the shipped base on the training plate with
that recipe (as a fine-tune job would), then the same recipe is fitted on each test plate and Flow
Fusion segments its fields. F1@0.5 is pooled over fields, with a 95 % bootstrap interval over
fields. The time each preprocessing step costs per field is measured on the test plate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from app.science.preprocessing import IlluminationModel

#: (illumination, darkfield, normalization) recipes compared; the first is Cellpose's default.
RECIPES: tuple[tuple[str, bool, str], ...] = (
    ("none", False, "per-image"),
    ("per-plate", False, "per-image"),
    ("per-plate", True, "per-image"),
    ("none", False, "per-plate"),
    ("per-plate", True, "per-plate"),
)


def shading(shape: tuple[int, int], strength: float = 0.6) -> np.ndarray:
    """A microscope's vignetting: 1 at the centre of the field, ``1 - strength`` at its corners."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    r2 = ((yy - (shape[0] - 1) / 2) / shape[0]) ** 2 + ((xx - (shape[1] - 1) / 2) / shape[1]) ** 2
    return (1.0 - strength * r2 / r2.max()).astype(np.float32)


def acquire(fields, profile: np.ndarray, gain: float, offset: float = 100.0):
    """Image a plate through ``profile`` at ``gain`` (the camera offset is not shaded)."""
    out = []
    for f in fields:
        image = offset + (f.image - offset) * profile * gain
        out.append(replace(f, image=np.clip(image, 0, 65535).astype(np.float32)))
    return out


@dataclass
class FittedRecipe:
    """A recipe fitted on one plate: an illumination model (or None), per channel (low, high) (or None)."""

    illumination: IlluminationModel | None
    percentiles: list[tuple[float, float] | None]

    def prepare(self, image: np.ndarray) -> np.ndarray:
        return np.asarray(image, np.float32) if self.illumination is None else self.illumination.apply(image)


def fit_recipe(
    images: list[np.ndarray],
    illumination: str,
    normalization: str,
    darkfield: bool = False,
    timings: dict[str, float] | None = None,
) -> FittedRecipe:
    """Fit a recipe on a plate of (C, Y, X) raw fields, exactly as the jobs do
    (``workers.pipelines.preprocess``): BaSiC on the raw fields, then percentiles of the corrected."""
    from app.science.preprocessing import fit_basic, plate_percentiles

    n_channels = images[0].shape[0]
    tic = time.perf_counter()
    model = fit_basic(images, get_darkfield=darkfield) if illumination == "per-plate" else None
    if timings is not None:
        timings["basic fit"] = (time.perf_counter() - tic) / len(images)
    fitted = FittedRecipe(model, [None] * n_channels)
    tic = time.perf_counter()
    corrected = [fitted.prepare(im) for im in images]
    if timings is not None:
        timings["correction"] = (time.perf_counter() - tic) / len(images)
    tic = time.perf_counter()
    if normalization == "per-plate":
        fitted.percentiles = list(plate_percentiles(corrected))
    if timings is not None:
        timings["plate percentiles"] = (time.perf_counter() - tic) / len(images)
    return fitted


def run_preprocessing_benchmark(
    *,
    n_train: int = 12,
    n_val: int = 4,
    n_test: int = 12,
    size: int = 192,
    max_epochs: int = 40,
    reporters: tuple[int, ...] = (0, 2),
    obj: str = "nuclei",
    test_gains: tuple[float, ...] = (1.0, 0.35),
    n_boot: int = 1000,
    echo: Callable[[str], None] = print,
) -> dict:
    from app.science.backbone import Normalization
    from app.science.metrics import match, pooled_f1_interval
    from app.science.segmentation import ChannelModel, segment_field
    from app.science.synthetic import DEFAULT_IMAGING, DEFAULT_REPORTERS, make_plate
    from app.science.training import TrainingConfig, finetune
    from app.science.weights import load_model
    from models_zoo.registry import shipped_base_models

    chosen = [DEFAULT_REPORTERS[i] for i in reporters]
    flat_optics = replace(DEFAULT_IMAGING, vignetting=(0.0, 0.0))  # the shading comes from the microscope
    profile = shading((size, size))
    train_plate = acquire(
        make_plate(n_train + n_val, size=size, seed=21, reporters=chosen, imaging=flat_optics), profile, gain=1.0
    )
    test_fields = make_plate(n_test, size=size, seed=22, reporters=chosen, imaging=flat_optics)
    test_plates = {gain: acquire(test_fields, profile, gain) for gain in test_gains}
    entry = shipped_base_models()[0]
    base, _card = load_model(entry.weights_path, expected_sha256=entry.weights_sha256)
    truth = [f.nuclei if obj == "nuclei" else f.cells for f in test_fields]
    echo(
        f"preprocessing bench: {obj} from {', '.join(r.name for r in chosen)}; {n_train}+{n_val} training fields "
        f"({size}²), {n_test} test fields at plate gains {', '.join(map(str, test_gains))}; vignetting to "
        f"{profile.min():.0%} at the corners; base {entry.name}, up to {max_epochs} epochs per model"
    )
    rows: list[dict[str, Any]] = []
    for illumination, darkfield, normalization in RECIPES:
        label = f"illumination {illumination}{' + darkfield' if darkfield else ''}, normalisation {normalization}"
        train_images = [f.image for f in train_plate]
        recipe = fit_recipe(train_images, illumination, normalization, darkfield)
        models = []
        for c, reporter in enumerate(chosen):
            prepared = []
            for image in train_images:
                plane = recipe.prepare(image)[c]
                if (bounds := recipe.percentiles[c]) is not None:
                    low, high = bounds
                    plane = (plane - low) / (high - low)
                prepared.append(plane.astype(np.float32))
            masks = [f.nuclei if obj == "nuclei" else f.cells for f in train_plate]
            config = TrainingConfig(
                max_epochs=max_epochs,
                min_epochs=10,
                patience=8,
                bsize=128,
                seed=0,
                normalize_per_image=normalization == "per-image",
            )
            result = finetune(base, prepared[:n_train], masks[:n_train], prepared[n_train:], masks[n_train:], config)
            models.append(
                ChannelModel(
                    result.net, diameter=result.diameter, diam_mean=float(result.net.diam_mean), name=reporter.name
                )
            )
        for gain, plate in test_plates.items():
            timings: dict[str, float] = {}
            images = [f.image for f in plate]
            fitted = fit_recipe(images, illumination, normalization, darkfield, timings)
            matchings = []
            for image, true in zip(images, truth, strict=True):
                inputs = fitted.prepare(image)
                norms = [
                    Normalization(low=p[0], high=p[1]) if p is not None else Normalization() for p in fitted.percentiles
                ]
                labels = segment_field(inputs, models, normalizations=norms).labels
                matchings.append(match(true, labels))
            f1, lo, hi = pooled_f1_interval(matchings, n_boot=n_boot)
            rows.append({"recipe": label, "gain": gain, "f1": f1, "interval": (lo, hi), "timings_s": timings})
            echo(
                f"  {label:58s} gain {gain:4.2f}: F1 {f1:.3f} [{lo:.3f}, {hi:.3f}]  per field: "
                + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items())
            )
    default = "illumination none, normalisation per-image"
    baseline = {row["gain"]: row["f1"] for row in rows if row["recipe"] == default}
    echo("F1 change against Cellpose's default (no correction, per-image percentiles):")
    for row in rows:
        echo(f"  {row['recipe']:58s} gain {row['gain']:4.2f}: {row['f1'] - baseline[row['gain']]:+.3f}")
    return {"rows": rows}
