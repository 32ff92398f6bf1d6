"""Benchmarks run end to end on tiny settings and report what they promise (numbers, not timings)."""

import numpy as np
import pytest

from app.benchmarks.ablation import run_ablation_benchmark


@pytest.mark.slow
def test_ablation_benchmark_trains_both_arms_and_scores_both_acquisitions():
    lines: list[str] = []
    result = run_ablation_benchmark(n_train=3, n_val=1, n_test=2, size=96, max_epochs=2, seeds=(0,), echo=lines.append)
    assert set(result["summary"]) == {"with microscopy augmentations", "geometry only"}
    for arm in result["summary"].values():
        assert 0.0 <= arm["same"] <= 1.0 and 0.0 <= arm["shifted"] <= 1.0
    assert lines[-1].startswith("F1 gain on the shifted acquisition")


@pytest.mark.slow
def test_quality_benchmark_smoke_runs_every_row_with_intervals():
    from app.benchmarks.quality import LABEL_METHODS, run_quality_benchmark

    lines: list[str] = []
    result = run_quality_benchmark(small=True, regimes=["one-blind"], echo=lines.append)
    summary = result["regimes"]["one-blind"]
    rows = summary["rows"]
    assert {"Flow Fusion, learned", "Flow Fusion, equal weights (0.7)", "joint 3-channel model", *LABEL_METHODS} <= set(
        rows
    )
    assert sum(row.endswith(" alone") for row in rows) == 3
    for row in rows.values():
        low, high = row["interval"]
        assert 0.0 <= low <= row["f1"] <= high <= 1.0
    assert summary["fusion"]["method"] in ("equal", "weights", "per_pixel")
    assert lines[-1].startswith("quality bench finished")
    # The zero-shot rows: the shipped base on 2 held-out DSB2018 images (when the checkout has them).
    from app.science.pretrain import default_dsb_dirs

    if all(d.is_dir() for d in default_dsb_dirs()):
        zero_shot = result["zero_shot"]
        assert [(r["rescale"], r["diameter"]) for r in zero_shot] == [
            (0.5, "estimated"),
            (0.5, "true"),
            (2.0, "estimated"),
            (2.0, "true"),
        ]
        assert all(r["n_images"] == 2 and r["ci_low"] <= r["f1"] <= r["ci_high"] for r in zero_shot)
    else:
        assert result["zero_shot"] is None and any(line.startswith("zero-shot rows skipped") for line in lines)


@pytest.mark.slow
def test_plate_benchmark_runs_every_route_through_the_real_api():
    from app.benchmarks.plate import run_plate_benchmark

    lines: list[str] = []
    result = run_plate_benchmark(n_fields=2, size=128, n_channels=2, train_steps=5, echo=lines.append)
    assert result["n_fields"] == 2 and result["precision"] in ("fp32", "bf16")
    for key in ("api_today_s", "api_plate_s", "direct_s", "engine_s", "naive_s"):
        assert result[key] > 0
    # The times are rounded to 0.1 ms; the ratio must lie within what that rounding allows.
    half_step = 0.00005
    low = (result["api_plate_s"] - half_step) / (result["direct_s"] + half_step)
    high = (result["api_plate_s"] + half_step) / (result["direct_s"] - half_step)
    assert low - 0.0005 <= result["api_over_direct"] <= high + 0.0005
    assert 0.0 <= result["mask_f1_vs_today_min"] <= result["mask_f1_vs_today_mean"] <= 1.0
    assert any(line.startswith("API time / direct segment_field loop:") for line in lines)
    assert lines[-1].startswith("naive route / API:")


def test_plate_fields_are_distinct_and_shaped():
    from app.benchmarks.plate import plate_fields

    fields, diameter, nuclei = plate_fields(5, size=64, n_channels=3, unique=2)
    assert len(fields) == 5 and all(f.shape == (3, 64, 64) and f.dtype.name == "uint16" for f in fields)
    assert diameter > 0 and nuclei.shape == (64, 64)
    assert len({f.tobytes() for f in fields}) == 5


@pytest.mark.slow
def test_precision_benchmark_compares_masks_and_time(tmp_path):
    import tifffile

    from app.benchmarks.precision import run_precision_benchmark
    from app.science.synthetic import make_plate

    (tmp_path / "images").mkdir()
    for i, field in enumerate(make_plate(2, size=96, seed=5)):
        tifffile.imwrite(tmp_path / "images" / f"{i}.tif", field.image[0].astype(np.uint16))
    lines: list[str] = []
    result = run_precision_benchmark(2, precision="bf16", data=tmp_path, echo=lines.append)
    assert result["precision"] == "bf16" and result["n_fields"] == 2
    assert result["fp32_s"] > 0 and result["bf16_s"] > 0
    assert result["f1_mean"] is None or 0.0 <= result["f1_min"] <= result["f1_mean"] <= 1.0
    assert lines[-1].startswith("speed-up ratio (bf16 over fp32):")


@pytest.mark.slow
def test_preprocessing_benchmark_scores_every_recipe_at_every_gain():
    from app.benchmarks.preprocessing import RECIPES, STEPS, recipe_label, run_preprocessing_benchmark

    lines: list[str] = []
    result = run_preprocessing_benchmark(
        n_train=3, n_val=2, n_test=5, size=96, max_epochs=1, n_boot=20, seed=1, echo=lines.append
    )
    assert result["setup"]["seed"] == 1 and result["setup"]["n_test"] == 5
    assert len(result["rows"]) == len(RECIPES) * 2
    assert {(row["recipe"], row["gain"]) for row in result["rows"]} == {
        (recipe_label(*recipe), gain) for recipe in RECIPES for gain in (1.0, 0.35)
    }
    for row in result["rows"]:
        assert 0.0 <= row["interval"][0] <= row["f1"] <= row["interval"][1] <= 1.0
        corrects = row["recipe"].startswith("illumination per-plate")
        per_plate = row["recipe"].endswith("normalisation per-plate")
        expected = ({"basic fit", "correction"} if corrects else set()) | (
            {"plate percentiles"} if per_plate else set()
        )
        assert set(row["timings_s"]) == expected and all(v > 0 for v in row["timings_s"].values())
        assert (row["illumination"] is not None) == corrects
    # the printed table: a header, then every recipe × gain with its interval and a column per step
    table = lines[-len(result["rows"]) :]
    assert all(line.count("[") == 1 and len(line.split()) >= len(STEPS) + 5 for line in table)
    assert table[0].startswith("illumination none, normalisation per-image")


def test_preprocessing_table_marks_steps_a_recipe_does_not_run():
    from app.benchmarks.preprocessing import summary_table

    rows = [
        {"recipe": "a", "gain": 1.0, "f1": 0.8, "interval": (0.7, 0.9), "timings_s": {}},
        {"recipe": "b", "gain": 1.0, "f1": 0.6, "interval": (0.5, 0.7), "timings_s": {"plate percentiles": 0.002}},
    ]
    header, columns, first, second = summary_table(rows, "a")
    assert "basic fit" in columns and "correction" in columns and "plate percentiles" in columns
    assert first.split()[-3:] == ["-", "-", "-"] and "+0.000" in first
    assert second.split()[-3:] == ["-", "-", "0.0020"] and "-0.200" in second and "[0.500, 0.700]" in second


def test_fit_recipe_times_only_the_steps_it_runs():
    import numpy as np

    from app.benchmarks.preprocessing import fit_recipe

    rng = np.random.default_rng(0)
    images = [rng.uniform(100, 400, (2, 32, 32)).astype(np.float32) for _ in range(4)]
    timings: dict[str, float] = {}
    fitted = fit_recipe(images, "none", "per-image", timings=timings)
    assert timings == {} and fitted.percentiles == [None, None]
    fitted = fit_recipe(images, "none", "per-plate", timings=timings)
    assert set(timings) == {"plate percentiles"} and all(p is not None and p[0] < p[1] for p in fitted.percentiles)


def test_shading_is_one_at_the_centre_and_falls_at_the_corners():
    from app.benchmarks.preprocessing import shading

    profile = shading((65, 65), strength=0.6)
    assert profile[32, 32] == pytest.approx(1.0, abs=1e-3) and profile[0, 0] == pytest.approx(0.4, abs=1e-3)


def test_zero_shot_bootstrap_pools_whole_images():
    import numpy as np

    from app.benchmarks.zero_shot import bootstrap_interval, pooled_f1

    counts = np.array([[9, 1, 0], [8, 0, 2], [0, 5, 5]])
    assert pooled_f1(counts) == 2 * 17 / (2 * 17 + 6 + 7)
    low, high = bootstrap_interval(counts, n_boot=400, seed=1)
    assert low < pooled_f1(counts) < high and high <= 1.0
    assert bootstrap_interval(counts[:1], n_boot=50) == (pooled_f1(counts[:1]), pooled_f1(counts[:1]))


@pytest.mark.slow
def test_zero_shot_rows_cover_every_rescale_and_diameter_mode():
    import json

    from app.benchmarks.zero_shot import zero_shot_rows
    from app.science.backbone import build_network
    from app.science.training import train_size_model
    from tests.science.test_training import TINY, disc_set

    images, masks = disc_set(range(2), size=64, n=3)
    net = build_network(TINY)
    size_model = train_size_model(net, images, masks, scales=(0.75, 1.0, 1.5))
    lines: list[str] = []
    rows = zero_shot_rows(
        net,
        size_model,
        images,
        masks,
        rescales=(0.5, 1.0),
        default_diameter=17.0,
        n_boot=50,
        with_scores=True,
        echo=lines.append,
    )
    assert [(r["rescale"], r["diameter"]) for r in rows] == [
        (0.5, "estimated"),
        (0.5, "default"),
        (0.5, "true"),
        (1.0, "estimated"),
        (1.0, "default"),
        (1.0, "true"),
    ]
    assert len(lines) == 6 and json.loads(json.dumps(rows))
    for row in rows:
        assert row["ci_low"] <= row["f1"] <= row["ci_high"] and row["n_images"] == 2
        assert row["scores"]["tp"] == row["tp"]
    true_rows = {r["rescale"]: r for r in rows if r["diameter"] == "true"}
    assert true_rows[0.5]["median_abs_log_ratio"] == 0.0
    assert abs(true_rows[0.5]["median_true_diameter"] / true_rows[1.0]["median_true_diameter"] - 0.5) < 0.1
    assert {r["median_diameter"] for r in rows if r["diameter"] == "default"} == {17.0}
