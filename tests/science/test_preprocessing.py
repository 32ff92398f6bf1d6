"""Tests for app.science.preprocessing: normalisation, flat-field correction, CLAHE, the record."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from scipy import ndimage as ndi

from app.science.preprocessing import (
    IlluminationModel,
    PercentileNormalizer,
    PreprocessingError,
    PreprocessingSpec,
    clahe,
    estimate_flatfield,
    fit_basic,
    reference_flatfield,
)


def _vignette(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / size
    return 1.0 - 0.6 * ((y - 0.45) ** 2 + (x - 0.55) ** 2) / 0.5


def _vignetted_fields(n: int, size: int, channels: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Blobs at random places on a uniform background, times a vignette, plus an offset and noise."""
    rng = np.random.default_rng(seed)
    shading = _vignette(size)
    fields = []
    for _ in range(n):
        planes = []
        for c in range(channels):
            objects = ndi.gaussian_filter((rng.random((size, size)) < 0.002).astype(float), 2.0) * 60
            scene = (50.0 + 20 * c + 200.0 * objects) * shading
            planes.append(scene + 100.0 + rng.normal(0, 1.0, (size, size)))
        fields.append(np.stack(planes).astype(np.float32))
    return fields


def _cv_of_flat_scene(model: IlluminationModel, size: int, offset: float = 100.0) -> float:
    """Coefficient of variation of a uniform scene seen through the vignette, after correction."""
    seen = np.broadcast_to(50.0 * _vignette(size) + offset, model.flatfield.shape)
    corrected = model.apply(seen)[0]
    return float(corrected.std() / corrected.mean())


def _cv_uncorrected(size: int) -> float:
    shading = _vignette(size)
    return float(shading.std() / shading.mean())


# --------------------------------------------------------------------------------------------
# Percentile normalisation
# --------------------------------------------------------------------------------------------


def test_percentiles_are_over_the_dataset_so_dim_fields_stay_dim() -> None:
    rng = np.random.default_rng(0)
    dim = rng.uniform(0, 100, (2, 32, 32))
    bright = rng.uniform(0, 1000, (2, 32, 32))
    norm = PercentileNormalizer.fit([dim, bright], lower=1.0, upper=99.0)
    assert norm.n_channels == 2
    np.testing.assert_allclose(norm.high, np.percentile(np.concatenate([dim, bright], 2), 99, axis=(1, 2)))
    out = norm.apply(dim)
    assert out.dtype == np.float32 and out.shape == dim.shape
    assert out.max() < 0.2  # per-image normalisation would have stretched it to 1
    assert norm.apply(bright).max() > 0.99


def test_subsampling_is_deterministic_and_close_to_exact() -> None:
    rng = np.random.default_rng(1)
    fields = [rng.gamma(2.0, 50.0, (3, 128, 128)) for _ in range(4)]
    exact = PercentileNormalizer.fit(fields)
    sampled = PercentileNormalizer.fit(fields, max_samples=20_000)
    again = PercentileNormalizer.fit(fields, max_samples=20_000)
    np.testing.assert_array_equal(sampled.high, again.high)
    np.testing.assert_allclose(sampled.high, exact.high, rtol=0.05)
    np.testing.assert_allclose(sampled.low, exact.low, rtol=0.2, atol=1.0)


def test_constant_channel_and_channel_mismatch() -> None:
    norm = PercentileNormalizer.fit([np.ones((1, 4, 4)) * 7])
    assert np.all(norm.apply(np.ones((1, 4, 4)) * 7) == 0)
    with pytest.raises(PreprocessingError, match="fitted on 1 channels"):
        norm.apply(np.ones((2, 4, 4)))
    with pytest.raises(PreprocessingError, match="channel count"):
        PercentileNormalizer.fit([np.ones((1, 4, 4)), np.ones((2, 4, 4))])
    with pytest.raises(PreprocessingError, match="lower < upper"):
        PercentileNormalizer.fit([np.ones((1, 4, 4))], lower=50, upper=10)


def test_normalizer_round_trips_through_json() -> None:
    norm = PercentileNormalizer.fit([np.arange(50, dtype=float).reshape(2, 5, 5)])
    back = PercentileNormalizer.from_dict(json.loads(json.dumps(norm.as_dict())))
    np.testing.assert_array_equal(back.low, norm.low)
    np.testing.assert_array_equal(back.high, norm.high)
    assert (back.lower, back.upper) == (1.0, 99.0)


# --------------------------------------------------------------------------------------------
# Illumination correction
# --------------------------------------------------------------------------------------------


def test_gaussian_flatfield_reduces_vignetting() -> None:
    fields = _vignetted_fields(8, 96)
    model = estimate_flatfield(fields, darkfield=100.0)
    assert model.flatfield.shape == (2, 96, 96) and model.flatfield.dtype == np.float32
    np.testing.assert_allclose(model.flatfield.mean(axis=(1, 2)), 1.0, rtol=1e-5)
    before, after = _cv_uncorrected(96), _cv_of_flat_scene(model, 96)
    assert after < 0.6 * before, (before, after)  # measured: 0.17 -> 0.08 (BaSiC: 0.005)


def test_reference_flatfield_corrects_exactly() -> None:
    shading = _vignette(32)
    scene = np.random.default_rng(0).uniform(10, 20, (1, 32, 32))
    model = reference_flatfield(shading * 500.0)
    corrected = model.apply(scene * shading)
    np.testing.assert_allclose(corrected / corrected.mean(), scene / scene.mean(), rtol=1e-5)
    with pytest.raises(PreprocessingError, match="size it was estimated on"):
        model.apply(np.ones((1, 16, 16)))


def test_basic_flatfield_reduces_vignetting() -> None:
    fields = _vignetted_fields(8, 64, channels=1, seed=2)
    started = time.perf_counter()
    model = fit_basic(fields, darkfield=100.0)
    assert time.perf_counter() - started < 30
    assert model.method == "basic" and model.flatfield.shape == (1, 64, 64)
    np.testing.assert_allclose(model.flatfield.mean(), 1.0, rtol=1e-4)
    shading = _vignette(64)
    assert np.corrcoef(model.flatfield[0].ravel(), shading.ravel())[0, 1] > 0.8
    before, after = _cv_uncorrected(64), _cv_of_flat_scene(model, 64)
    assert after < 0.2 * before, (before, after)  # measured: 0.17 -> 0.005


# --------------------------------------------------------------------------------------------
# CLAHE
# --------------------------------------------------------------------------------------------


def test_clahe_stretches_a_dim_region() -> None:
    rng = np.random.default_rng(0)
    image = np.zeros((2, 64, 64))
    image[:, :, :32] = 0.05 + 0.02 * rng.random((2, 64, 32))  # dim half with faint texture
    image[:, :, 32:] = 0.6 + 0.3 * rng.random((2, 64, 32))
    out = clahe(image, clip_limit=0.02)
    assert out.shape == image.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert out[0, :, :32].std() > 2 * image[0, :, :32].std()
    with pytest.raises(PreprocessingError, match="clip_limit"):
        clahe(image, clip_limit=0.0)


# --------------------------------------------------------------------------------------------
# The spec and its record
# --------------------------------------------------------------------------------------------


def test_spec_round_trips_as_json_and_rejects_unknown_settings() -> None:
    spec = PreprocessingSpec(illumination="gaussian", clahe=True, clahe_kernel_size=16, upper_percentile=99.5)
    back = PreprocessingSpec.from_dict(json.loads(json.dumps(spec.as_dict())))
    assert back == spec
    with pytest.raises(PreprocessingError, match="unknown preprocessing settings"):
        PreprocessingSpec.from_dict({"illumination": "none", "gamma": 2})
    with pytest.raises(PreprocessingError, match="unknown illumination"):
        PreprocessingSpec(illumination="cidre")  # type: ignore[arg-type]


def test_spec_apply_runs_steps_in_order_and_records_them() -> None:
    fields = _vignetted_fields(6, 64)
    spec = PreprocessingSpec(illumination="gaussian", clahe=True)
    out, record = spec.apply(fields)
    assert len(out) == 6 and all(f.shape == (2, 64, 64) and f.dtype == np.float32 for f in out)
    assert record.steps == ("illumination:gaussian", "normalize", "clahe")
    as_json = json.loads(record.to_json())
    assert as_json["spec"] == spec.as_dict()
    assert len(as_json["normalizer"]["low"]) == 2
    assert as_json["illumination"]["method"] == "gaussian"
    # reapplying with the recorded normaliser and the same flatfield reproduces the output
    normalizer = PercentileNormalizer.from_dict(as_json["normalizer"])
    model = estimate_flatfield(fields)
    again, _ = spec.apply(fields, normalizer=normalizer, illumination=model)
    np.testing.assert_allclose(again[0], out[0], atol=1e-6)


def test_default_spec_only_normalises_and_reference_needs_an_image() -> None:
    fields = _vignetted_fields(2, 32)
    out, record = PreprocessingSpec().apply(fields)
    assert record.steps == ("normalize",) and record.illumination is None
    assert np.percentile(np.stack(out)[:, 0], 99) == pytest.approx(1.0, abs=0.02)
    with pytest.raises(PreprocessingError, match="needs a reference"):
        PreprocessingSpec(illumination="reference").apply(fields)
    out, record = PreprocessingSpec(illumination="reference").apply(fields, reference=_vignette(32))
    assert record.illumination["method"] == "reference" and out[0].shape == (2, 32, 32)


def test_bad_fields_are_rejected() -> None:
    with pytest.raises(PreprocessingError, match="at least one"):
        PreprocessingSpec().apply([])
    with pytest.raises(PreprocessingError, match=r"\(C, Y, X\)"):
        PreprocessingSpec().apply([np.ones((4, 4))])
    with pytest.raises(PreprocessingError, match="one size"):
        estimate_flatfield([np.ones((1, 4, 4)), np.ones((1, 5, 5))])
    assert isinstance(IlluminationModel(np.ones((1, 2, 2), np.float32)).summary()["sha256"], str)
