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

#: (illumination, darkfield, normalization) recipes compared; the first is Cellpose's default. Every
#: combination a fine-tune accepts with an estimated profile: 3 illuminations × 2 normalisations.
RECIPES: tuple[tuple[str, bool, str], ...] = (
    ("none", False, "per-image"),
    ("per-plate", False, "per-image"),
    ("per-plate", True, "per-image"),
    ("none", False, "per-plate"),
    ("per-plate", False, "per-plate"),
    ("per-plate", True, "per-plate"),
)

#: The preprocessing steps timed per field, in the order they run.
STEPS = ("basic fit", "correction", "plate percentiles")


def recipe_label(illumination: str, darkfield: bool, normalization: str) -> str:
    return f"illumination {illumination}{' + darkfield' if darkfield else ''}, normalisation {normalization}"


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


def illumination_check(model: IlluminationModel | None) -> dict[str, list[float]] | None:
    """What BaSiC estimated, per channel, against the truth of these plates: the flatfield's corner /
    centre ratio (the shading is 0.4) and the darkfield's mean (the unshaded camera offset is 100)."""
    if model is None:
        return None
    flat = model.flatfield
    y, x = flat.shape[1] // 2, flat.shape[2] // 2
    centre = flat[:, y - 1 : y + 2, x - 1 : x + 2].mean(axis=(1, 2))
    corners = np.stack([flat[:, :3, :3], flat[:, :3, -3:], flat[:, -3:, :3], flat[:, -3:, -3:]]).mean(axis=(0, 2, 3))
    dark = [0.0] * flat.shape[0] if model.darkfield is None else model.darkfield.mean(axis=(1, 2)).tolist()
    return {"flat_corner_over_centre": (corners / centre).tolist(), "darkfield_mean": [float(d) for d in dark]}


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
    # Only the steps the recipe runs are timed (a step it skips costs nothing and has no row).
    steps: dict[str, float] = {}
    model = None
    if illumination == "per-plate":
        tic = time.perf_counter()
        model = fit_basic(images, get_darkfield=darkfield)
        steps["basic fit"] = (time.perf_counter() - tic) / len(images)
    fitted = FittedRecipe(model, [None] * n_channels)
    tic = time.perf_counter()
    corrected = [fitted.prepare(im) for im in images]
    if model is not None:
        steps["correction"] = (time.perf_counter() - tic) / len(images)
    if normalization == "per-plate":
        tic = time.perf_counter()
        fitted.percentiles = list(plate_percentiles(corrected))
        steps["plate percentiles"] = (time.perf_counter() - tic) / len(images)
    if timings is not None:
        timings.update(steps)
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
    seed: int = 0,
    recipes: tuple[tuple[str, bool, str], ...] = RECIPES,
    echo: Callable[[str], None] = print,
) -> dict:
    """-> {"setup": the arguments, "rows": one per recipe × test gain (recipe, gain, f1, interval,
    timings_s: seconds per field of each step the recipe runs, fitted on that test plate)}.

    ``seed`` picks the synthetic plates (0: the plates of the README's rows) and the training seed.
    """
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
        make_plate(n_train + n_val, size=size, seed=21 + 2 * seed, reporters=chosen, imaging=flat_optics),
        profile,
        gain=1.0,
    )
    test_fields = make_plate(n_test, size=size, seed=22 + 2 * seed, reporters=chosen, imaging=flat_optics)
    test_plates = {gain: acquire(test_fields, profile, gain) for gain in test_gains}
    entry = shipped_base_models()[0]
    base, _card = load_model(entry.weights_path, expected_sha256=entry.weights_sha256)
    truth = [f.nuclei if obj == "nuclei" else f.cells for f in test_fields]
    echo(
        f"preprocessing bench: {obj} from {', '.join(r.name for r in chosen)}; {n_train}+{n_val} training fields "
        f"({size}²), {n_test} test fields at plate gains {', '.join(map(str, test_gains))}; vignetting to "
        f"{profile.min():.0%} at the corners; base {entry.name}, up to {max_epochs} epochs per model; seed {seed}"
    )
    rows: list[dict[str, Any]] = []
    for illumination, darkfield, normalization in recipes:
        label = recipe_label(illumination, darkfield, normalization)
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
                min_epochs=min(10, max_epochs),
                patience=8,
                bsize=128,
                seed=seed,
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
            check = illumination_check(fitted.illumination)
            rows.append(
                {
                    "recipe": label,
                    "gain": gain,
                    "f1": f1,
                    "interval": (lo, hi),
                    "timings_s": timings,
                    "illumination": check,
                }
            )
            echo(
                f"  {label:60s} gain {gain:4.2f}: F1 {f1:.3f} [{lo:.3f}, {hi:.3f}]  per field: "
                + (", ".join(f"{k} {v:.3f} s" for k, v in timings.items()) or "no preprocessing step")
                + (
                    ""
                    if check is None
                    else "; flatfield corner/centre "
                    + " / ".join(f"{v:.2f}" for v in check["flat_corner_over_centre"])
                    + " (true 0.40), darkfield mean "
                    + " / ".join(f"{v:.0f}" for v in check["darkfield_mean"])
                    + " (true 100)"
                )
            )
    for line in summary_table(rows, recipe_label(*recipes[0])):
        echo(line)
    setup = {
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "size": size,
        "max_epochs": max_epochs,
        "reporters": [r.name for r in chosen],
        "obj": obj,
        "test_gains": list(test_gains),
        "n_boot": n_boot,
        "seed": seed,
    }
    return {"setup": setup, "rows": rows}


def summary_table(rows: list[dict[str, Any]], baseline_recipe: str) -> list[str]:
    """Every recipe × gain: F1 with its interval, its change against the baseline recipe at that gain,
    and the seconds per field of each preprocessing step ("-": the recipe does not run it)."""
    baseline = {row["gain"]: row["f1"] for row in rows if row["recipe"] == baseline_recipe}
    head = f"{'recipe':60s} {'gain':>5s} {'F1 [95 % interval]':>22s} {'vs default':>10s}"
    head += "".join(f" {step:>17s}" for step in STEPS)
    lines = [f"F1 change against {baseline_recipe}; seconds per field of each step ('-': not run):", head]
    for row in rows:
        lo, hi = row["interval"]
        delta = row["f1"] - baseline[row["gain"]] if row["gain"] in baseline else float("nan")
        line = f"{row['recipe']:60s} {row['gain']:5.2f} {row['f1']:7.3f} [{lo:.3f}, {hi:.3f}] {delta:+10.3f}"
        line += "".join(
            f" {row['timings_s'][step]:17.4f}" if step in row["timings_s"] else f" {'-':>17s}" for step in STEPS
        )
        lines.append(line)
    return lines
