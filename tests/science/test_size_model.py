"""Size model: closed-form ridge from style to log diameter (Cellpose 3's SizeModel)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from app.science.size_model import SizeModel, SizeModelError, fit_size_model


def _linear_data(n: int = 300, d: int = 16, seed: int = 0, noise: float = 0.0):
    rng = np.random.default_rng(seed)
    styles = rng.normal(size=(n, d))
    styles /= np.linalg.norm(styles, axis=1, keepdims=True)  # unit norm, as network styles are
    weights = rng.normal(scale=0.8, size=d)
    log_diameters = math.log(25.0) + styles @ weights + noise * rng.normal(size=n)
    return styles, np.exp(log_diameters), weights


def test_recovers_a_synthetic_linear_relation():
    styles, diameters, weights = _linear_data()
    model = fit_size_model(styles, diameters, ridge=1e-8, diam_mean=30.0)
    np.testing.assert_allclose(model.coefficients, weights, atol=1e-5)
    new_styles = np.random.default_rng(9).normal(size=(20, 16))
    new_styles /= np.linalg.norm(new_styles, axis=1, keepdims=True)
    new_diameters = np.exp(math.log(25.0) + new_styles @ weights)
    np.testing.assert_allclose(model.predict(new_styles), new_diameters, rtol=1e-5)
    assert model.train_correlation > 0.999


def test_generalises_under_noise_and_ridge_shrinks():
    styles, diameters, _ = _linear_data(noise=0.05, seed=1)
    model = fit_size_model(styles[:200], diameters[:200], ridge=1.0)
    predicted = model.predict(styles[200:])
    relative_error = np.abs(predicted / diameters[200:] - 1)
    assert np.median(relative_error) < 0.1
    strong = fit_size_model(styles[:200], diameters[:200], ridge=1e6)
    assert np.linalg.norm(strong.coefficients) < 0.01 * np.linalg.norm(model.coefficients)
    # Fully shrunk, the prediction is the geometric mean diameter of the training set.
    assert strong.predict(styles[0]) == pytest.approx(math.exp(np.log(diameters[:200]).mean()), rel=1e-3)


def test_more_dimensions_than_images_matches_the_primal_solution():
    """Dual (N x N) and primal (D x D) solves give the same ridge answer."""
    rng = np.random.default_rng(3)
    styles, diameters = rng.normal(size=(10, 40)), np.exp(rng.normal(3, 0.2, size=10))
    dual = fit_size_model(styles, diameters, ridge=0.5)
    x = styles - styles.mean(axis=0)
    y = np.log(diameters) - math.log(30.0)
    primal = np.linalg.solve(x.T @ x + 0.5 * np.eye(40), x.T @ (y - y.mean()))
    np.testing.assert_allclose(dual.coefficients, primal, atol=1e-9)


def test_round_trips_through_json():
    styles, diameters, _ = _linear_data(n=50, d=128, seed=2)
    model = fit_size_model(styles, diameters, diam_mean=17.0)
    restored = SizeModel.from_dict(json.loads(json.dumps(model.to_dict())))
    np.testing.assert_array_equal(restored.coefficients, model.coefficients)
    assert restored.diam_mean == 17.0 and restored.n_train == 50
    assert restored.predict(styles[3]) == model.predict(styles[3])


def test_never_predicts_below_five_pixels():
    styles = np.array([[0.0], [1.0], [2.0]])
    model = fit_size_model(styles, np.array([1.0, 0.5, 0.25]), ridge=1e-9)
    assert model.predict(np.array([5.0])) == 5.0


def test_bad_inputs_raise_clear_errors():
    styles, diameters, _ = _linear_data(n=10, d=4)
    with pytest.raises(SizeModelError, match="one diameter per style"):
        fit_size_model(styles, diameters[:5])
    with pytest.raises(SizeModelError, match="positive"):
        fit_size_model(styles, -diameters)
    model = fit_size_model(styles, diameters)
    with pytest.raises(SizeModelError, match="another width"):
        model.predict(np.zeros(256))
    with pytest.raises(SizeModelError, match="not a size model"):
        SizeModel.from_dict({"coefficients": [1.0]})


def _discs(diameter: float, n: int = 4, size: int = 128) -> np.ndarray:
    """n x n well-separated discs of the given diameter, labelled 1..n*n."""
    labels = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    step = size / n
    for i in range(n):
        for j in range(n):
            disc = (yy - (i + 0.5) * step) ** 2 + (xx - (j + 0.5) * step) ** 2 < (diameter / 2) ** 2
            labels[disc] = i * n + j + 1
    return labels


def test_mask_diameter_is_cellposes_median_equivalent_diameter():
    from cellpose import utils

    from app.science.size_model import mask_diameter

    labels = _discs(14.0)
    labels[labels == 3] = 0  # a gap in the ids changes nothing
    diameter, count = mask_diameter(labels)
    assert count == 15
    assert diameter == pytest.approx(float(utils.diameters(labels)[0]), rel=1e-9)
    assert mask_diameter(np.zeros((8, 8), np.int32)) == (0.0, 0)


def test_two_pass_estimate_takes_the_masks_median_at_the_style_diameter():
    from app.science.size_model import estimate_diameter, mask_diameter

    # A style model that overestimates by ~40 %; the segmentation finds the true 16-px discs.
    model = SizeModel(np.zeros(4), np.zeros(4), math.log(1.4 * 16.0 / 30.0), 30.0, 1.0, 10)
    asked = []

    def segment(diameter: float) -> np.ndarray:
        asked.append(diameter)
        return _discs(16.0)

    estimate = estimate_diameter(np.ones(4) / 2, model, segment)
    assert asked == [pytest.approx(1.4 * 16.0)]  # the second pass runs at the style estimate
    assert estimate.source == "masks" and estimate.n_objects == 16
    assert estimate.style_diameter == pytest.approx(22.4)
    assert estimate.diameter == pytest.approx(mask_diameter(_discs(16.0))[0])
    assert abs(estimate.diameter - 16.0) < 1.0
    assert json.loads(json.dumps(estimate.to_dict()))["source"] == "masks"


def test_two_pass_estimate_keeps_the_style_diameter_when_nothing_is_found():
    from app.science.size_model import combine_estimates, estimate_diameter

    model = SizeModel(np.zeros(4), np.zeros(4), 0.0, 25.0, 1.0, 10)
    blind = estimate_diameter(np.zeros(4), model, lambda d: np.zeros((32, 32), np.int32))
    assert blind.source == "style" and blind.diameter == pytest.approx(25.0) and blind.mask_diameter is None
    seeing = estimate_diameter(np.zeros(4), model, lambda d: _discs(12.0))
    # A channel blind to the object does not pull the field's diameter.
    assert combine_estimates([blind, seeing]) == pytest.approx(seeing.diameter)
    assert combine_estimates([blind]) == pytest.approx(25.0)
    assert combine_estimates([]) is None


def _shrunk_model_and_styles(seed: int = 2):
    """A size model fitted with Cellpose's ridge on unit styles whose direction encodes log size:
    the fit shrinks towards its centre, as the base's does for objects far from 30 px."""
    rng = np.random.default_rng(seed)
    log_sizes = rng.uniform(math.log(8.0), math.log(80.0), 400)

    def style_of(log_size: float) -> np.ndarray:
        angle = (log_size - math.log(8.0)) / math.log(10.0) * (math.pi / 2)  # 8 px -> 0, 80 px -> pi/2
        return np.array([math.cos(angle), math.sin(angle), 0.0, 0.0])

    model = fit_size_model(np.stack([style_of(v) for v in log_sizes]), np.exp(log_sizes), ridge=30.0)
    return model, style_of


def test_recentring_undoes_the_ridge_shrinkage_far_from_the_centre():
    from app.science.size_model import MAX_RECENTRE_ZOOM, recentred_style_diameter

    model, style_of = _shrunk_model_and_styles()
    for true in (9.0, 60.0):
        zooms: list[float] = []

        def style_at(diameter: float, true: float = true, zooms: list[float] = zooms) -> np.ndarray:
            zooms.append(model.diam_mean / diameter)
            return style_of(math.log(true * model.diam_mean / diameter))

        one_pass = model.predict(style_at(model.diam_mean))
        recentred = recentred_style_diameter(style_at, model, iterations=3)
        # One pass is pulled towards the centre; three recentred passes land far closer.
        assert abs(math.log(one_pass / true)) > 0.15
        assert abs(math.log(recentred / true)) < abs(math.log(one_pass / true)) / 3
        assert len(zooms) == 2 + 3  # the first style, its repeat, then one per pass
        assert all(1 / MAX_RECENTRE_ZOOM <= z <= MAX_RECENTRE_ZOOM for z in zooms)
    # No pass: the plain regression, on the style given.
    plain_style = style_of(math.log(60.0))
    assert recentred_style_diameter(lambda d: 1 / 0, model, iterations=0, first_style=plain_style) == pytest.approx(
        model.predict(plain_style)
    )
    with pytest.raises(SizeModelError):
        recentred_style_diameter(style_of, model, iterations=-1)


def test_recentring_stops_once_the_zoom_would_be_near_one():
    from app.science.size_model import recentred_style_diameter

    model, style_of = _shrunk_model_and_styles()
    centre = model.diam_mean * math.exp(model.log_offset)
    for true in (centre * 1.02, 60.0):
        zooms: list[float] = []

        def style_at(diameter: float, true: float = true, zooms: list[float] = zooms) -> np.ndarray:
            zooms.append(model.diam_mean / diameter)
            return style_of(math.log(true * model.diam_mean / diameter))

        estimate = recentred_style_diameter(style_at, model, iterations=3, tolerance=math.log(1.15))
        passes = len(zooms) - 1  # the first style is read unzoomed
        if true < 2 * centre:  # objects at the centre: no extra pass
            assert passes == 0
        else:  # far from it: at least one pass, and closer than the single pass
            assert 1 <= passes <= 3
            assert abs(math.log(estimate / true)) < abs(math.log(model.predict(style_of(math.log(true))) / true))


def test_two_pass_estimate_starts_from_a_given_style_diameter():
    from app.science.size_model import estimate_diameter

    model = SizeModel(np.zeros(4), np.zeros(4), 0.0, 30.0, 1.0, 10)
    asked = []
    estimate = estimate_diameter(np.zeros(4), model, lambda d: asked.append(d) or _discs(16.0), style_diameter=17.0)
    assert asked == [17.0] and estimate.style_diameter == 17.0 and estimate.source == "masks"
