"""Synthetic multi-reporter plates built on real nucleus masks.

There is no public annotated data of cells imaged with biological reporters only (no DAPI, no
membrane dye), so CellFuse makes its own: real DSB2018 nucleus masks (shipped in
``data/dsb2018_masks``, CC0) give the nuclei; whole cells are grown around them; each reporter
channel is rendered from the masks with the localisation of a real reporter and then "imaged":
point-spread blur, out-of-focus haze, uneven illumination, camera offset, Poisson shot noise and
Gaussian read noise.

It is built to be ambiguous per channel, as real reporters are: every reporter is missing or dim in
some cells, a cytoplasmic reporter leaves a hole where the nucleus is and fades towards the cell
edge, a translocating one sits in the nucleus of some cells and the cytoplasm of others, punctate
spots outline a cell only loosely. Fusing the channels recovers what one channel cannot.

>>> plate = make_plate(2, seed=0)
>>> plate[0].image.shape, plate[0].image.dtype, plate[0].channel_names
((4, 256, 256), dtype('float32'), ['cyto', 'nuclear', 'transloc', 'puncta'])
>>> bool((plate[0].cells[plate[0].nuclei > 0] == plate[0].nuclei[plate[0].nuclei > 0]).all())
True
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries, relabel_sequential, watershed

#: Real nucleus masks (uint16 TIFF) that the synthetic fields are built on; see ATTRIBUTION.md.
SEED_MASK_DIR = Path(__file__).parent / "data" / "dsb2018_masks"

#: Nuclei smaller than this (pixels) are dropped: slivers left by crops are not cells.
MIN_NUCLEUS_AREA = 20

Localisation = Literal["cytoplasmic", "nuclear", "translocating", "punctate", "membrane", "unrelated"]
#: Every localisation a reporter can have. ``unrelated`` is a channel blind to the objects: smooth
#: blotches of signal (a medium dye, extracellular matrix, a bleed-through) that ignore the cells.
LOCALISATIONS: tuple[str, ...] = ("cytoplasmic", "nuclear", "translocating", "punctate", "membrane", "unrelated")


class SyntheticSpecError(ValueError):
    """A reporter, imaging or plate specification that cannot be rendered."""


@dataclass(frozen=True)
class ReporterSpec:
    """How one reporter channel looks.

    ``brightness`` is the mean photon count of an expressing cell's brightest compartment;
    ``absent_fraction`` of cells do not express it (they sit at ``absent_level`` x brightness);
    per-cell expression is lognormal with ``expression_sigma``; ``other_compartment`` is the level
    of the compartment the reporter is NOT in, relative to the one it is in (nucleus for a
    cytoplasmic reporter, cytoplasm for a nuclear one; a translocating reporter draws a per-cell
    nuclear share instead); ``texture`` is the spread of the multiplicative fine texture;
    ``spot_density`` is spots per cytoplasm pixel (punctate only).
    """

    name: str
    localisation: Localisation
    absent_fraction: float = 0.15
    brightness: float = 400.0
    expression_sigma: float = 0.5
    absent_level: float = 0.04
    other_compartment: float = 0.15
    texture: float = 0.25
    spot_density: float = 0.02

    def __post_init__(self) -> None:
        if self.localisation not in LOCALISATIONS:
            raise SyntheticSpecError(f"unknown localisation {self.localisation!r} for reporter {self.name!r}")
        if not 0.0 <= self.absent_fraction < 1.0:
            raise SyntheticSpecError(f"absent_fraction must be in [0, 1); got {self.absent_fraction}")
        if self.brightness <= 0:
            raise SyntheticSpecError(f"brightness must be > 0 photons; got {self.brightness}")


#: Four reporters with different localisations, each absent or dim in some cells.
DEFAULT_REPORTERS: tuple[ReporterSpec, ...] = (
    ReporterSpec("cyto", "cytoplasmic", absent_fraction=0.15, brightness=300.0, other_compartment=0.25),
    ReporterSpec("nuclear", "nuclear", absent_fraction=0.2, brightness=450.0, other_compartment=0.1),
    ReporterSpec("transloc", "translocating", absent_fraction=0.15, brightness=350.0),
    ReporterSpec(
        "puncta", "punctate", absent_fraction=0.15, brightness=250.0, spot_density=0.03, other_compartment=0.2
    ),
)


#: Reporters for the quality benchmark's regimes (``REGIMES``): bright and expressed in nearly every
#: cell, dim and missing in many cells, and blind to the cells.
STRONG_CYTO = ReporterSpec(
    "cyto_strong", "cytoplasmic", absent_fraction=0.02, brightness=900.0, expression_sigma=0.25, other_compartment=0.2
)
WEAK_CYTO = ReporterSpec(
    "cyto_weak", "cytoplasmic", absent_fraction=0.35, brightness=40.0, expression_sigma=0.8, other_compartment=0.35
)
WEAK_TRANSLOC = ReporterSpec(
    "transloc_weak", "translocating", absent_fraction=0.35, brightness=40.0, expression_sigma=0.8
)
WEAK_PUNCTA = ReporterSpec(
    "puncta_weak",
    "punctate",
    absent_fraction=0.35,
    brightness=35.0,
    expression_sigma=0.8,
    spot_density=0.015,
    other_compartment=0.1,
)
BLIND = ReporterSpec("unrelated", "unrelated", absent_fraction=0.0, brightness=300.0)


@dataclass(frozen=True)
class ImagingSpec:
    """The microscope and camera: ranges are drawn per field (uniform)."""

    psf_sigma: tuple[float, float] = (1.0, 1.8)
    #: out-of-focus light: this fraction of the signal, blurred widely, is added back
    haze: tuple[float, float] = (0.1, 0.3)
    #: illumination falls to (1 - vignetting) at the far corner
    vignetting: tuple[float, float] = (0.2, 0.5)
    #: camera offset plus autofluorescence, counts
    offset: tuple[float, float] = (90.0, 130.0)
    read_noise: float = 4.0
    #: overall photon budget per field (dim fields are noisier relative to the signal)
    exposure: tuple[float, float] = (0.5, 1.5)
    #: cell size as (cell radius - nucleus radius) / nucleus radius, drawn per field
    cytoplasm_extent: tuple[float, float] = (0.6, 1.4)


DEFAULT_IMAGING = ImagingSpec()

#: An acquisition the models never saw: a quarter of the photons, more read noise, a softer focus,
#: stronger vignetting and haze (the same shift as the augmentation ablation).
SHIFTED_IMAGING = ImagingSpec(
    exposure=(0.12, 0.3), read_noise=12.0, psf_sigma=(1.8, 2.6), vignetting=(0.5, 0.7), haze=(0.3, 0.5)
)


@dataclass(frozen=True)
class Regime:
    """A kind of multi-reporter plate for benchmarks: its reporters and the acquisition of its
    test fields (training and validation fields always use ``DEFAULT_IMAGING``)."""

    name: str
    reporters: tuple[ReporterSpec, ...]
    description: str
    test_imaging: ImagingSpec = DEFAULT_IMAGING


#: The regimes Flow Fusion has to hold up in: fusion must never lose to the set's best channel.
REGIMES: dict[str, Regime] = {
    regime.name: regime
    for regime in (
        Regime("strong+weak", (STRONG_CYTO, WEAK_TRANSLOC, WEAK_PUNCTA), "one strong reporter and two weak ones"),
        Regime("all-weak", (WEAK_CYTO, WEAK_TRANSLOC, WEAK_PUNCTA), "three weak reporters"),
        Regime("one-blind", (WEAK_CYTO, WEAK_TRANSLOC, BLIND), "two weak reporters and one channel blind to the cells"),
        Regime(
            "shifted",
            (STRONG_CYTO, WEAK_TRANSLOC, WEAK_PUNCTA),
            "strong+weak reporters; test fields dimmer, noisier and blurrier than training",
            SHIFTED_IMAGING,
        ),
    )
}


@dataclass
class SyntheticField:
    """One synthetic field of view with its ground truth.

    ``image`` is float32 (K, Y, X) in camera counts (integer valued, offset included) like a 16-bit
    camera's output; ``nuclei`` and ``cells`` are int32 (Y, X) labels; cell i contains nucleus i.
    ``extra`` records the drawn imaging parameters and the median nucleus and cell diameters.
    """

    image: np.ndarray
    channel_names: list[str]
    nuclei: np.ndarray
    cells: np.ndarray
    well: str = "A01"
    field: int = 0
    seed_name: str = ""
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Seed masks
# --------------------------------------------------------------------------------------------


def seed_mask_names() -> list[str]:
    """File stems of the shipped seed masks, in the order ``load_seed_masks`` returns them."""
    return [p.stem for p in sorted(SEED_MASK_DIR.glob("*.tif"))]


def load_seed_masks(names: Sequence[str] | None = None) -> list[np.ndarray]:
    """The shipped real nucleus masks (uint16, 256 x 256, consecutive ids), sorted by name."""
    names = seed_mask_names() if names is None else list(names)
    if not names:
        raise FileNotFoundError(f"no seed masks in {SEED_MASK_DIR}: the package data is missing")
    return [tifffile.imread(SEED_MASK_DIR / f"{name}.tif") for name in names]


def clean_nuclei(labels: np.ndarray, min_area: int = MIN_NUCLEUS_AREA) -> np.ndarray:
    """Consecutive int32 ids, objects smaller than ``min_area`` removed."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise SyntheticSpecError(f"a seed mask must be a 2-D integer label image; got {labels.dtype} {labels.shape}")
    areas = np.bincount(labels.ravel().astype(np.int64))
    small = areas < min_area
    small[0] = False
    cleaned = np.where(small[labels], 0, labels)
    return relabel_sequential(cleaned.astype(np.int32))[0].astype(np.int32)


def _smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    noise = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return noise / (noise.std() + 1e-12)


def grow_cells(nuclei: np.ndarray, rng: np.random.Generator, extent: float = 1.0) -> np.ndarray:
    """Whole cells around nuclei: every cell contains exactly its nucleus (same id).

    Each cell reaches ``extent`` x its nucleus's radius (times a per-cell factor) beyond the nucleus;
    a noisy distance makes the boundary irregular and non-convex, and a watershed from the nuclei
    splits the space between neighbours, so dense cells touch.
    """
    if nuclei.max() == 0:
        return nuclei.copy()
    n = int(nuclei.max())
    areas = np.bincount(nuclei.ravel(), minlength=n + 1)[1:]
    radius = np.sqrt(areas / np.pi)
    reach = np.concatenate([[0.0], radius * extent * rng.lognormal(0.0, 0.25, n)])
    distance, (iy, ix) = ndi.distance_transform_edt(nuclei == 0, return_indices=True)
    nearest = nuclei[iy, ix]
    scale = float(np.median(radius))
    # two scales of boundary noise: lobes (low frequency) and ruffles (high frequency)
    wobble = 0.45 * _smooth_noise(nuclei.shape, 2.0 * scale, rng) + 0.2 * _smooth_noise(nuclei.shape, 0.4 * scale, rng)
    noisy = distance * (1.0 + 0.5 * wobble) + 0.35 * scale * wobble
    region = (noisy < reach[nearest]) | (nuclei > 0)
    cells = watershed(noisy, markers=nuclei, mask=region)
    # a cell's fragment cut off from its body by a neighbour becomes background
    return _keep_marker_components(cells.astype(np.int32), nuclei)


def _keep_marker_components(cells: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Drop pixels of each cell that are not connected to the cell's nucleus."""
    components = np.zeros_like(cells)
    for obj_slice, obj in zip(ndi.find_objects(cells), range(1, int(cells.max()) + 1), strict=False):
        if obj_slice is None:
            continue
        mine = cells[obj_slice] == obj
        lab, count = ndi.label(mine)
        if count > 1:
            anchor = lab[(nuclei[obj_slice] == obj) & mine]
            mine = np.isin(lab, np.unique(anchor))
        components[obj_slice][mine] = obj
    return components


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _per_cell_expression(n: int, spec: ReporterSpec, rng: np.random.Generator) -> np.ndarray:
    expression = rng.lognormal(0.0, spec.expression_sigma, n) * np.exp(-(spec.expression_sigma**2) / 2)
    absent = rng.random(n) < spec.absent_fraction
    expression[absent] = spec.absent_level * rng.uniform(0.5, 1.5, absent.sum())
    return np.concatenate([[0.0], expression])


def _render_reporter(
    spec: ReporterSpec,
    nuclei: np.ndarray,
    cells: np.ndarray,
    cyto_profile: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Ideal photon density (before optics) of one reporter, float64 (Y, X)."""
    n = int(cells.max())
    expression = _per_cell_expression(n, spec, rng)[cells]
    in_nucleus = nuclei > 0
    in_cyto = (cells > 0) & ~in_nucleus
    texture = np.exp(spec.texture * _smooth_noise(cells.shape, 1.2, rng))
    signal = np.zeros(cells.shape)
    if spec.localisation == "cytoplasmic":
        signal[in_cyto] = cyto_profile[in_cyto]
        signal[in_nucleus] = spec.other_compartment
    elif spec.localisation == "nuclear":
        signal[in_nucleus] = _nucleus_pattern(nuclei, rng)[in_nucleus]
        signal[in_cyto] = spec.other_compartment * cyto_profile[in_cyto]
    elif spec.localisation == "translocating":
        # each cell's nuclear share: a mix of resting (mostly cytoplasmic) and activated cells
        activated = rng.random(n + 1) < 0.5
        share = np.where(activated, rng.beta(5, 2, n + 1), rng.beta(2, 5, n + 1))
        signal[in_nucleus] = share[nuclei][in_nucleus] * 1.6
        signal[in_cyto] = (1.0 - share[cells][in_cyto]) * cyto_profile[in_cyto]
    elif spec.localisation == "punctate":
        spots = (rng.random(cells.shape) < spec.spot_density) & in_cyto
        # spots concentrate near the nucleus, as endosomes and mitochondria do
        spots &= rng.random(cells.shape) < (0.35 + 0.65 * cyto_profile)
        amplitude = rng.gamma(2.0, 2.0, cells.shape)
        signal[spots] = amplitude[spots]
        signal[in_cyto] += spec.other_compartment * cyto_profile[in_cyto]
        signal[in_nucleus] = 0.5 * spec.other_compartment
        texture = np.ones_like(texture)  # the spots are the texture
    elif spec.localisation == "unrelated":
        # blotches about a cell wide, independent of where the cells are; every "cell" expresses it
        scale = max(2.0, 0.5 * median_diameter(cells)) if n else 4.0
        return np.exp(0.8 * _smooth_noise(cells.shape, scale, rng)) * texture
    elif spec.localisation == "membrane":
        edge = find_boundaries(cells, mode="inner") & (cells > 0)
        edge = ndi.binary_dilation(edge) & (cells > 0)
        signal[in_cyto] = spec.other_compartment
        signal[edge] = 1.0
    return signal * expression * texture


def _nucleus_pattern(nuclei: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Nuclear staining: brighter rim-free interior with dark nucleoli-like dimples."""
    n = int(nuclei.max())
    areas = np.bincount(nuclei.ravel(), minlength=n + 1).astype(float)
    count = rng.integers(1, 4, n + 1)
    per_pixel = np.divide(count, areas, out=np.zeros(n + 1), where=areas > 0)
    seeds = (rng.random(nuclei.shape) < per_pixel[nuclei]) & (nuclei > 0)
    radius = max(1.5, 0.12 * float(np.sqrt(np.median(areas[1:]) / np.pi))) if n else 1.5
    dimples = ndi.gaussian_filter(seeds.astype(float), radius)
    dimples /= dimples.max() + 1e-12
    # chromatin is denser (brighter) away from the nuclear edge
    inside = ndi.distance_transform_edt(nuclei > 0)
    depth = 1.0 - np.exp(-inside / 3.0)
    return (0.75 + 0.25 * depth) * (1.0 - 0.6 * dimples)


def _cytoplasm_profile(nuclei: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """1 next to the nucleus, falling towards the cell edge (cells are thinner at the periphery)."""
    distance = ndi.distance_transform_edt(nuclei == 0)
    n = int(cells.max())
    if n == 0:
        return np.zeros(cells.shape)
    reach = ndi.maximum(distance, labels=cells, index=np.arange(n + 1))
    reach = np.maximum(np.asarray(reach), 1.0)
    relative = distance / reach[cells]
    return np.where(cells > 0, 0.3 + 0.7 * np.exp(-2.0 * relative), 0.0)


def _illumination(shape: tuple[int, ...], strength: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative field: off-centre radial fall-off plus a gentle low-frequency ripple."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    cy, cx = (rng.uniform(0.2, 0.8) * shape[0], rng.uniform(0.2, 0.8) * shape[1])
    r2 = ((y - cy) ** 2 + (x - cx) ** 2) / float(max(shape) ** 2)
    field = 1.0 - strength * r2 / r2.max()
    ripple = _smooth_noise(shape, max(shape) / 6.0, rng)
    return field * (1.0 + 0.05 * ripple)


def _image(
    signal: np.ndarray,
    photons: float,
    illumination: np.ndarray,
    imaging: ImagingSpec,
    rng: np.random.Generator,
    psf_sigma: float,
    offset: float,
) -> np.ndarray:
    """Optics and camera: blur, haze, illumination, shot noise, offset, read noise."""
    sharp = ndi.gaussian_filter(signal, psf_sigma)
    haze = rng.uniform(*imaging.haze) * ndi.gaussian_filter(signal, 8.0 * psf_sigma)
    expected = (sharp + haze) * photons * illumination
    # autofluorescence of the medium and slide: a few photons everywhere
    expected += 0.01 * photons * illumination
    counts = rng.poisson(np.maximum(expected, 0.0)).astype(np.float64)
    counts += offset + rng.normal(0.0, imaging.read_noise, counts.shape)
    return np.clip(np.rint(counts), 0, 65535).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Fields and plates
# --------------------------------------------------------------------------------------------


def _random_view(mask: np.ndarray, size: int | None, rng: np.random.Generator) -> np.ndarray:
    """A random flip/rotation of the seed, cropped (or zero-padded) to size x size."""
    mask = np.rot90(mask, int(rng.integers(4)))
    if rng.random() < 0.5:
        mask = mask[:, ::-1]
    if size is None:
        return np.ascontiguousarray(mask)
    out = np.zeros((size, size), dtype=mask.dtype)
    ys = int(rng.integers(0, max(mask.shape[0] - size, 0) + 1))
    xs = int(rng.integers(0, max(mask.shape[1] - size, 0) + 1))
    crop = mask[ys : ys + size, xs : xs + size]
    out[: crop.shape[0], : crop.shape[1]] = crop
    return out


def make_field(
    seed_mask: np.ndarray,
    reporters: Sequence[ReporterSpec] = DEFAULT_REPORTERS,
    rng: np.random.Generator | None = None,
    size: int | None = None,
    *,
    imaging: ImagingSpec = DEFAULT_IMAGING,
    well: str = "A01",
    field: int = 0,
    seed_name: str = "",
) -> SyntheticField:
    """Render one field: nuclei from ``seed_mask`` (randomly flipped, rotated, cropped), cells grown
    around them, one channel per reporter."""
    if not reporters:
        raise SyntheticSpecError("at least one reporter is needed to render a field")
    if size is not None and size < 16:
        raise SyntheticSpecError(f"field size must be >= 16 pixels; got {size}")
    rng = np.random.default_rng() if rng is None else rng
    nuclei = clean_nuclei(_random_view(np.asarray(seed_mask), size, rng))
    extent = rng.uniform(*imaging.cytoplasm_extent)
    cells = grow_cells(nuclei, rng, extent)
    profile = _cytoplasm_profile(nuclei, cells)
    psf_sigma = rng.uniform(*imaging.psf_sigma)
    exposure = rng.uniform(*imaging.exposure)
    base_illumination = _illumination(nuclei.shape, rng.uniform(*imaging.vignetting), rng)
    channels = []
    for spec in reporters:
        # channels share the lamp's fall-off but each filter set adds its own small deviation
        illumination = base_illumination * (1.0 + 0.03 * _smooth_noise(nuclei.shape, 40.0, rng))
        signal = _render_reporter(spec, nuclei, cells, profile, rng)
        offset = rng.uniform(*imaging.offset)
        channels.append(_image(signal, spec.brightness * exposure, illumination, imaging, rng, psf_sigma, offset))
    return SyntheticField(
        image=np.stack(channels).astype(np.float32),
        channel_names=[spec.name for spec in reporters],
        nuclei=nuclei,
        cells=cells,
        well=well,
        field=field,
        seed_name=seed_name,
        extra={
            "psf_sigma": float(psf_sigma),
            "exposure": float(exposure),
            "cytoplasm_extent": float(extent),
            "nucleus_diameter": median_diameter(nuclei),
            "cell_diameter": median_diameter(cells),
        },
    )


def median_diameter(labels: np.ndarray) -> float:
    """Diameter (pixels) of a disc with the median object area; 0.0 without objects.

    The number to give Cellpose as ``diameter`` for these objects.
    """
    areas = np.bincount(np.asarray(labels).ravel())[1:]
    areas = areas[areas > 0]
    return float(2.0 * np.sqrt(np.median(areas) / np.pi)) if areas.size else 0.0


def well_names(count: int, columns: int = 12) -> list[str]:
    """Plate well names in row-major order: A01, A02, ..., A12, B01, ..."""
    rows = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    if count > len(rows) * columns:
        raise SyntheticSpecError(f"a plate with {columns} columns has at most {len(rows) * columns} wells")
    return [f"{rows[i // columns]}{i % columns + 1:02d}" for i in range(count)]


def make_plate(
    n_fields: int,
    *,
    reporters: Sequence[ReporterSpec] = DEFAULT_REPORTERS,
    size: int | None = 256,
    seed: int = 0,
    wells: Sequence[str] | None = None,
    fields_per_well: int = 4,
    seed_masks: Sequence[np.ndarray] | None = None,
    imaging: ImagingSpec = DEFAULT_IMAGING,
) -> list[SyntheticField]:
    """``n_fields`` synthetic fields, deterministic for a ``seed``.

    Fields rotate through the seed masks (a seeded shuffle of them) with random flips, rotations and
    crops; field ``i`` is the same whatever ``n_fields`` is, so a longer plate extends a shorter
    one. Field ``i`` lies in well ``i // fields_per_well`` (``wells`` cycles when shorter).
    """
    if n_fields < 0:
        raise SyntheticSpecError(f"n_fields must be >= 0; got {n_fields}")
    if fields_per_well < 1:
        raise SyntheticSpecError(f"fields_per_well must be >= 1; got {fields_per_well}")
    masks = list(load_seed_masks() if seed_masks is None else seed_masks)
    names = seed_mask_names() if seed_masks is None else [f"mask{i}" for i in range(len(masks))]
    if not masks:
        raise SyntheticSpecError("no seed masks to build fields on")
    n_wells = -(-n_fields // fields_per_well)
    wells = list(wells) if wells else well_names(max(n_wells, 1))
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED])).permutation(len(masks))
    children = np.random.SeedSequence(seed).spawn(n_fields)
    plate = []
    for i, child in enumerate(children):
        index = int(order[i % len(masks)])
        plate.append(
            make_field(
                masks[index],
                reporters,
                np.random.default_rng(child),
                size,
                imaging=imaging,
                well=wells[(i // fields_per_well) % len(wells)],
                field=i % fields_per_well,
                seed_name=names[index],
            )
        )
    return plate


def plate_to_arrays(fields: Sequence[SyntheticField]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack fields of one size: images (N, K, Y, X) float32, nuclei and cells (N, Y, X) int32."""
    if not fields:
        raise SyntheticSpecError("no fields to stack")
    shapes = {f.image.shape for f in fields}
    if len(shapes) > 1:
        raise SyntheticSpecError(f"fields differ in shape and cannot be stacked: {sorted(shapes)}")
    return (
        np.stack([f.image for f in fields]),
        np.stack([f.nuclei for f in fields]),
        np.stack([f.cells for f in fields]),
    )
