"""Training augmentations for channel-wise fine-tuning: geometry on image and flow targets, plus
microscopy-like photometric corruptions on the image.

Each augmentation is applied to a sample with probability ``config.probability`` (0.5):

=================  ===========================================================================
geometric          scale s ~ U[0.5, 1], rotation phi ~ U[-pi/2, pi/2], flip X, flip Y
photometric        Gaussian noise (mu 0, sigma ~ U[0, 0.1] of the normalised range), Poisson noise,
("microscopy")     salt and pepper, brightness shift delta ~ U(-0.1, 0.1) (clipped)
=================  ===========================================================================

Flow targets are Cellpose's ``[cell probability, flow Y, flow X]``. Geometry is one affine map
applied to image and targets with the same matrix; the flow *vectors* are then rotated and flipped
by the linear part of that map (as ``cellpose.transforms.random_rotate_and_resize`` does), so they
keep pointing at the centres of the transformed objects. Scaling leaves unit flow vectors unchanged.

Every sample comes out as a fixed ``bsize x bsize`` crop (zero-padded when the image is smaller).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> image = np.zeros((1, 300, 300), np.float32); flows = np.zeros((3, 300, 300), np.float32)
>>> out_image, out_flows = augment(image, flows, rng, AugmentationConfig(bsize=224))
>>> out_image.shape, out_flows.shape
((1, 224, 224), (3, 224, 224))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

GEOMETRIC: tuple[str, ...] = ("scale", "rotate", "flip_x", "flip_y")
PHOTOMETRIC: tuple[str, ...] = ("gaussian_noise", "poisson_noise", "salt_pepper", "brightness")
AUGMENTATIONS: tuple[str, ...] = GEOMETRIC + PHOTOMETRIC


class AugmentationError(ValueError):
    """An augmentation was asked for with inputs or settings it cannot work with."""


@dataclass(frozen=True)
class AugmentationConfig:
    """Which augmentations run, how often, and how strongly.

    ``enabled=False`` switches the whole group off (a plain crop remains); ``microscopy=False`` is
    the ablation switch that keeps geometry but drops the photometric corruptions. ``include``
    narrows the set further (used to force one augmentation in tests and ablations).
    """

    bsize: int = 224
    probability: float = 0.5
    enabled: bool = True
    microscopy: bool = True
    include: frozenset[str] = field(default_factory=lambda: frozenset(AUGMENTATIONS))
    scale_range: tuple[float, float] = (0.5, 1.0)
    max_rotation: float = math.pi / 2
    max_gaussian_sigma: float = 0.1
    #: Photons at the top of the normalised range; low = strong shot noise. Drawn log-uniformly.
    poisson_peak_range: tuple[float, float] = (10.0, 300.0)
    max_salt_pepper_fraction: float = 0.02
    max_brightness_shift: float = 0.1

    def __post_init__(self) -> None:
        unknown = set(self.include) - set(AUGMENTATIONS)
        if unknown:
            raise AugmentationError(f"unknown augmentation(s) {sorted(unknown)}; choose from {list(AUGMENTATIONS)}")
        if not 0.0 <= self.probability <= 1.0:
            raise AugmentationError(f"probability must be in [0, 1], got {self.probability}")
        if self.bsize < 16:
            raise AugmentationError(f"bsize (crop size) must be at least 16 pixels, got {self.bsize}")
        low, high = self.scale_range
        if not 0.0 < low <= high:
            raise AugmentationError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        # frozenset() of a list given by a caller keeps the dataclass hashable and immutable.
        object.__setattr__(self, "include", frozenset(self.include))

    def active(self, name: str) -> bool:
        """Whether augmentation ``name`` may run at all under this configuration."""
        if not self.enabled or name not in self.include:
            return False
        return self.microscopy or name not in PHOTOMETRIC


@dataclass(frozen=True)
class GeometryParams:
    """One sample's geometric transform: ``dst = matrix @ [x, y, 1]`` in pixel coordinates."""

    matrix: np.ndarray  # (2, 3) float64, source -> crop
    bsize: int
    scale: float  # total zoom (training rescale x scale augmentation)
    rotation: float  # radians
    flip_x: bool
    flip_y: bool

    @property
    def vector_matrix(self) -> np.ndarray:
        """How a flow vector (vx, vy) turns: rotation and flips only (flows are unit vectors)."""
        return self.matrix[:, :2] / self.scale


def sample_geometry(
    shape: tuple[int, ...], rng: np.random.Generator, config: AugmentationConfig, *, zoom: float = 1.0
) -> GeometryParams:
    """Draw one sample's crop position, scale, rotation and flips.

    ``zoom`` is the fixed training rescale (``diam_mean / diameter``) that the random scale
    multiplies. Random numbers are always drawn in the same order, so switching an augmentation
    off does not change the others for a given seed.
    """
    if zoom <= 0 or not math.isfinite(zoom):
        raise AugmentationError(f"zoom must be a positive finite number, got {zoom}")
    n_y, n_x = shape
    p = config.probability
    draws = rng.random(4)
    scale_draw, angle_draw, offset_draw = rng.random(), rng.random(), rng.random(2)

    scale = zoom
    if config.active("scale") and draws[0] < p:
        low, high = config.scale_range
        scale *= low + (high - low) * scale_draw
    rotation = 0.0
    if config.active("rotate") and draws[1] < p:
        rotation = (2.0 * angle_draw - 1.0) * config.max_rotation
    flip_x = bool(config.active("flip_x") and draws[2] < p)
    flip_y = bool(config.active("flip_y") and draws[3] < p)

    bsize = config.bsize
    # A random crop inside the (scaled) image; centred when the image is smaller than the crop.
    centre = np.array([(n_x - 1) / 2.0, (n_y - 1) / 2.0])
    slack = np.maximum(0.0, np.array([n_x, n_y]) - bsize / scale) / 2.0
    source_centre = centre + (2.0 * offset_draw - 1.0) * slack
    cos, sin = math.cos(rotation), math.sin(rotation)
    flips = np.diag([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0])
    linear = scale * np.array([[cos, -sin], [sin, cos]]) @ flips
    crop_centre = np.array([(bsize - 1) / 2.0, (bsize - 1) / 2.0])
    # Whole-pixel translation: a plain crop then copies pixels instead of interpolating them.
    translation = np.round(crop_centre - linear @ source_centre)
    matrix = np.hstack([linear, translation[:, None]])
    return GeometryParams(matrix, bsize, float(scale), float(rotation), flip_x, flip_y)


def warp_image(image: np.ndarray, geometry: GeometryParams) -> np.ndarray:
    """Apply the geometry to every channel of a (C, Y, X) image (bilinear, zero outside)."""
    return np.stack([_warp(channel, geometry, cv2.INTER_LINEAR) for channel in image]).astype(np.float32)


def warp_labels(labels: np.ndarray, geometry: GeometryParams) -> np.ndarray:
    """Apply the geometry to a (Y, X) label image (nearest neighbour, so ids stay ids)."""
    return _warp(labels.astype(np.float32), geometry, cv2.INTER_NEAREST).astype(labels.dtype)


def warp_flows(flows: np.ndarray, geometry: GeometryParams) -> np.ndarray:
    """Apply the geometry to ``[cellprob, flow Y, flow X]`` and turn the vectors with it."""
    cellprob = _warp(flows[0], geometry, cv2.INTER_NEAREST)
    flow_y = _warp(flows[1], geometry, cv2.INTER_LINEAR)
    flow_x = _warp(flows[2], geometry, cv2.INTER_LINEAR)
    turn = geometry.vector_matrix
    new_x = turn[0, 0] * flow_x + turn[0, 1] * flow_y
    new_y = turn[1, 0] * flow_x + turn[1, 1] * flow_y
    return np.stack([cellprob, new_y, new_x]).astype(np.float32)


def _warp(plane: np.ndarray, geometry: GeometryParams, interpolation: int) -> np.ndarray:
    return cv2.warpAffine(
        np.ascontiguousarray(plane, dtype=np.float32),
        geometry.matrix,
        (geometry.bsize, geometry.bsize),
        flags=interpolation,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0.0,
    )


def apply_photometric(image: np.ndarray, rng: np.random.Generator, config: AugmentationConfig) -> np.ndarray:
    """Noise, salt and pepper and a brightness shift on a normalised (C, Y, X) image (new array)."""
    p = config.probability
    draws = rng.random(4)
    out = image.astype(np.float32, copy=True)
    low, high = min(0.0, float(out.min())), max(1.0, float(out.max()))
    if config.active("gaussian_noise") and draws[0] < p:
        sigma = config.max_gaussian_sigma * rng.random()
        out += rng.normal(0.0, sigma, size=out.shape).astype(np.float32)
    if config.active("poisson_noise") and draws[1] < p:
        lo_peak, hi_peak = config.poisson_peak_range
        peak = math.exp(math.log(lo_peak) + (math.log(hi_peak) - math.log(lo_peak)) * rng.random())
        # Shot noise acts on the non-negative signal; the negative part (below background) stays.
        signal = np.clip(out, 0.0, None)
        out += (rng.poisson(signal * peak) / peak - signal).astype(np.float32)
    if config.active("salt_pepper") and draws[2] < p:
        fraction = config.max_salt_pepper_fraction * rng.random()
        hit = rng.random(out.shape) < fraction
        salt = rng.random(out.shape) < 0.5
        out[hit & salt] = 1.0
        out[hit & ~salt] = 0.0
    if config.active("brightness") and draws[3] < p:
        shift = (2.0 * rng.random() - 1.0) * config.max_brightness_shift
        # Clip to the normalised range (widened to the sample's own extremes so that pixels
        # already beyond [0, 1] before the shift are not flattened by it).
        out = np.clip(out + np.float32(shift), low, high)
    return out


def augment(
    image: np.ndarray,
    flows: np.ndarray,
    rng: np.random.Generator,
    config: AugmentationConfig = AugmentationConfig(),
    *,
    zoom: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """One augmented ``bsize`` crop of a normalised (C, Y, X) image and its (3, Y, X) flow targets.

    ``zoom`` rescales before augmenting (``diam_mean / diameter`` puts objects at ``diam_mean``
    pixels). Photometric corruptions touch the image only.

    >>> rng = np.random.default_rng(1)
    >>> img = np.random.default_rng(2).random((1, 64, 64)).astype(np.float32)
    >>> out, targets = augment(img, np.zeros((3, 64, 64), np.float32), rng, AugmentationConfig(bsize=32))
    >>> out.shape, targets.shape, out.dtype.name
    ((1, 32, 32), (3, 32, 32), 'float32')
    """
    if image.ndim != 3:
        raise AugmentationError(f"image must be (channels, Y, X), got shape {image.shape}")
    if flows.ndim != 3 or flows.shape[0] != 3 or flows.shape[1:] != image.shape[1:]:
        raise AugmentationError(
            f"flows must be (3, Y, X) = [cellprob, flow Y, flow X] matching the image's {image.shape[1:]}, "
            f"got shape {flows.shape}"
        )
    geometry = sample_geometry(image.shape[1:], rng, config, zoom=zoom)
    out_image = warp_image(image, geometry)
    out_flows = warp_flows(flows, geometry)
    out_image = apply_photometric(out_image, rng, config)
    return out_image, out_flows
