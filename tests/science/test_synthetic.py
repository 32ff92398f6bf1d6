"""Tests for app.science.synthetic: ground truth consistency, localisation, noise, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from app.science.synthetic import (
    DEFAULT_REPORTERS,
    ReporterSpec,
    SyntheticField,
    SyntheticSpecError,
    clean_nuclei,
    grow_cells,
    load_seed_masks,
    make_field,
    make_plate,
    plate_to_arrays,
    seed_mask_names,
    well_names,
)


@pytest.fixture(scope="module")
def plate() -> list[SyntheticField]:
    return make_plate(6, seed=7, fields_per_well=2)


def test_seed_masks_are_shipped_real_labels() -> None:
    masks = load_seed_masks()
    assert len(masks) == len(seed_mask_names()) >= 20
    for mask in masks:
        assert mask.dtype == np.uint16 and mask.shape == (256, 256)
        ids = np.unique(mask)
        assert ids[0] == 0 and ids.size - 1 == mask.max() >= 20  # consecutive, a decent number


def test_shapes_dtypes_and_metadata(plate: list[SyntheticField]) -> None:
    assert len(plate) == 6
    for f in plate:
        assert f.image.shape == (4, 256, 256) and f.image.dtype == np.float32
        assert f.nuclei.shape == f.cells.shape == (256, 256)
        assert f.nuclei.dtype == f.cells.dtype == np.int32
        assert f.channel_names == [r.name for r in DEFAULT_REPORTERS]
        assert np.all(f.image >= 0) and np.all(f.image == np.rint(f.image))  # camera counts
    assert [(f.well, f.field) for f in plate] == [
        ("A01", 0),
        ("A01", 1),
        ("A02", 0),
        ("A02", 1),
        ("A03", 0),
        ("A03", 1),
    ]
    images, nuclei, cells = plate_to_arrays(plate)
    assert images.shape == (6, 4, 256, 256) and nuclei.shape == cells.shape == (6, 256, 256)


def test_every_cell_contains_exactly_its_nucleus(plate: list[SyntheticField]) -> None:
    for f in plate:
        n = int(f.nuclei.max())
        assert n > 5
        assert np.array_equal(np.unique(f.nuclei), np.arange(n + 1))  # consecutive
        assert np.array_equal(np.unique(f.cells), np.arange(n + 1))  # cell ids == nucleus ids
        inside = f.nuclei > 0
        assert np.array_equal(f.cells[inside], f.nuclei[inside])
        # cells are bigger than their nuclei: there is cytoplasm
        cell_area = np.bincount(f.cells.ravel(), minlength=n + 1)[1:]
        nucleus_area = np.bincount(f.nuclei.ravel(), minlength=n + 1)[1:]
        assert np.median(cell_area / nucleus_area) > 1.8
        assert f.extra["cell_diameter"] > 1.3 * f.extra["nucleus_diameter"] > 10


def test_cells_touch_in_dense_fields(plate: list[SyntheticField]) -> None:
    from skimage.segmentation import find_boundaries

    touching = 0
    for f in plate:
        inner = find_boundaries(f.cells, mode="inner") & (f.cells > 0)
        outer_is_other_cell = find_boundaries(f.cells, mode="outer") & (f.cells > 0)
        touching += int((inner & outer_is_other_cell).sum())
    assert touching > 100


def _compartment_means(f: SyntheticField, channel: int) -> tuple[float, float]:
    image = f.image[channel]
    cyto = (f.cells > 0) & (f.nuclei == 0)
    return float(image[f.nuclei > 0].mean()), float(image[cyto].mean())


def test_cytoplasmic_reporter_is_dim_in_nuclei_and_nuclear_reporter_bright(plate: list[SyntheticField]) -> None:
    cyto_channel = [r.localisation for r in DEFAULT_REPORTERS].index("cytoplasmic")
    nuclear_channel = [r.localisation for r in DEFAULT_REPORTERS].index("nuclear")
    for f in plate:
        in_nucleus, in_cyto = _compartment_means(f, cyto_channel)
        assert in_nucleus < in_cyto
        in_nucleus, in_cyto = _compartment_means(f, nuclear_channel)
        assert in_nucleus > 1.3 * in_cyto


def test_some_cells_do_not_express_a_reporter(plate: list[SyntheticField]) -> None:
    f = plate[0]
    n = int(f.cells.max())
    for channel, spec in enumerate(DEFAULT_REPORTERS):
        background = float(np.median(f.image[channel][f.cells == 0]))
        per_cell = np.bincount(f.cells.ravel(), f.image[channel].ravel(), n + 1)[1:]
        per_cell /= np.bincount(f.cells.ravel(), minlength=n + 1)[1:]
        bright = np.percentile(per_cell, 90) - background
        absent = (per_cell - background) < 0.2 * bright
        assert absent.sum() >= 1, spec.name


def test_noise_is_present_and_image_is_not_flat(plate: list[SyntheticField]) -> None:
    f = plate[1]
    background = f.image[0][f.cells == 0]
    assert background.std() > 2.0  # read + shot noise
    # pixel-to-pixel differences in the background are noise, not smooth structure
    diffs = np.diff(f.image[0], axis=1)[(f.cells[:, 1:] == 0) & (f.cells[:, :-1] == 0)]
    assert diffs.std() > 2.0
    assert f.image[0].max() > 2 * np.median(background)


def test_deterministic_for_a_seed_and_different_for_another() -> None:
    a = make_plate(2, seed=11, size=96)
    b = make_plate(2, seed=11, size=96)
    c = make_plate(2, seed=12, size=96)
    longer = make_plate(3, seed=11, size=96)
    for x, y, z in zip(a, b, longer, strict=False):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.cells, y.cells)
        assert np.array_equal(x.image, z.image)  # a longer plate extends a shorter one
    assert not np.array_equal(a[0].image, c[0].image)


def test_size_crops_and_pads() -> None:
    mask = load_seed_masks()[0]
    rng = np.random.default_rng(0)
    small = make_field(mask, DEFAULT_REPORTERS[:1], rng, size=64)
    assert small.image.shape == (1, 64, 64)
    big = make_field(mask, DEFAULT_REPORTERS[:2], rng, size=300)
    assert big.image.shape == (2, 300, 300)
    assert big.cells.max() >= 1


def test_clean_nuclei_drops_slivers_and_relabels() -> None:
    labels = np.zeros((20, 20), np.uint16)
    labels[0:6, 0:6] = 5
    labels[10:12, 10:12] = 9  # 4 pixels: a sliver
    labels[12:18, 12:18] = 70
    cleaned = clean_nuclei(labels)
    assert cleaned.dtype == np.int32 and np.unique(cleaned).tolist() == [0, 1, 2]
    assert cleaned[11, 11] == 0


def test_grow_cells_keeps_empty_fields_empty() -> None:
    empty = np.zeros((32, 32), np.int32)
    assert grow_cells(empty, np.random.default_rng(0)).max() == 0


def test_membrane_reporter_and_custom_reporters() -> None:
    spec = ReporterSpec("edge", "membrane", absent_fraction=0.0)
    f = make_field(load_seed_masks()[1], [spec], np.random.default_rng(1), size=128)
    from skimage.segmentation import find_boundaries

    edge = find_boundaries(f.cells, mode="inner") & (f.cells > 0)
    interior = (f.cells > 0) & ~edge & (f.nuclei == 0)
    assert f.image[0][edge].mean() > f.image[0][interior].mean()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"localisation": "golgi"},
        {"localisation": "nuclear", "absent_fraction": 1.0},
        {"localisation": "nuclear", "brightness": 0.0},
    ],
)
def test_bad_reporter_specs_are_rejected(kwargs: dict) -> None:
    with pytest.raises(SyntheticSpecError):
        ReporterSpec("x", **kwargs)


def test_bad_plate_arguments_are_rejected() -> None:
    with pytest.raises(SyntheticSpecError, match="reporter"):
        make_field(load_seed_masks()[0], [], np.random.default_rng(0))
    with pytest.raises(SyntheticSpecError, match="n_fields"):
        make_plate(-1)
    with pytest.raises(SyntheticSpecError, match="stack"):
        plate_to_arrays([])
    assert well_names(14)[-2:] == ["B01", "B02"]


def test_regimes_render_their_reporters_and_the_blind_channel_ignores_cells() -> None:
    from app.science.synthetic import REGIMES, SHIFTED_IMAGING

    assert {"strong+weak", "all-weak", "one-blind", "shifted"} <= set(REGIMES)
    assert REGIMES["shifted"].test_imaging == SHIFTED_IMAGING
    regime = REGIMES["one-blind"]
    fields = make_plate(8, size=128, seed=4, reporters=regime.reporters)
    blind = regime.reporters.index(next(r for r in regime.reporters if r.localisation == "unrelated"))
    contrasts, blind_contrasts = [], []
    for f in fields:
        inside, outside = f.cells > 0, f.cells == 0
        contrasts.append(f.image[0][inside].mean() / f.image[0][outside].mean())
        blind_contrasts.append(f.image[blind][inside].mean() / f.image[blind][outside].mean())
    # the (weak) cell reporter is brighter in cells; the blind one is as often brighter as dimmer there
    assert min(contrasts) > 1.0 and np.median(contrasts) > 1.1
    assert 0.8 < np.median(blind_contrasts) < 1.25 and min(blind_contrasts) < 1.0 < max(blind_contrasts)
    strong, weak = (
        make_plate(2, size=128, seed=5, reporters=REGIMES["strong+weak"].reporters)[0].image[k] for k in (0, 1)
    )
    assert np.percentile(strong, 99) - np.median(strong) > 5 * (np.percentile(weak, 99) - np.median(weak))
    dim = make_plate(1, size=128, seed=5, reporters=REGIMES["strong+weak"].reporters, imaging=SHIFTED_IMAGING)[0]
    assert (
        dim.image[0].mean()
        < make_plate(1, size=128, seed=5, reporters=REGIMES["strong+weak"].reporters)[0].image[0].mean()
    )
