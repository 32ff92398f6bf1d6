"""Flow Fusion: average the raw Cellpose maps of K channel models, then reconstruct masks once.

Each reporter channel goes through its own model; the maps (flow Y, flow X, cell-probability logit)
are averaged over the chosen channels and Cellpose's dynamics turn the fused maps into instances.
A cell that one reporter shows poorly is still found when the other reporters carry it.

>>> import numpy as np
>>> a = np.zeros((3, 2, 2), np.float32); b = np.ones((3, 2, 2), np.float32)
>>> float(fuse_maps([a, b])[0, 0, 0]), float(fuse_maps([a, b], weights=[1, 3])[0, 0, 0])
(0.5, 0.75)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Flow-error threshold for masks from FUSED maps. Cellpose's 0.4 compares each mask's own flow
#: field with the predicted flows; averaged flows are shorter wherever channels disagree (vectors
#: of different direction, or a channel that does not see the cell, partly cancel), so the error
#: rises for masks that are right and 0.4 throws good cells away. Measured on 8 synthetic
#: 4-reporter fields (256 px, cells, plate seed 2) with four half-width models trained ~5 min each
#: (two of them poor), pooled F1@0.5 of Flow Fusion over all four channels by flow_threshold:
#: 0.2 -> 0.07, 0.4 -> 0.67, 0.6 -> 0.87, 0.7 -> 0.885, 0.8 -> 0.89, 1.0 -> 0.85, 0 (no check)
#: -> 0.85; the best single channel reached 0.77 at 0.4. 0.7 was the most robust across channel
#: subsets ({cyto, puncta}: 0.88; {cyto, nuclear, puncta}: 0.89). 0 or None turns the check off.
FUSED_FLOW_THRESHOLD: float = 0.7


class FusionInputError(ValueError):
    """Maps or weights that cannot be fused."""


def _as_array(maps) -> np.ndarray:
    """Accept a ChannelMaps record (anything with ``.maps``) or a (3, Y, X) array."""
    array = np.asarray(getattr(maps, "maps", maps))
    if array.ndim != 3 or array.shape[0] != 3:
        raise FusionInputError(
            f"each channel's maps must be (3, Y, X) [flow_y, flow_x, cellprob], got shape {array.shape}"
        )
    return array


def check_weights(weights: Sequence[float] | np.ndarray | None, n_channels: int) -> np.ndarray:
    """Non-negative, finite, not all zero, one per channel; normalised to sum 1."""
    if weights is None:
        return np.full(n_channels, 1.0 / n_channels)
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.size != n_channels:
        raise FusionInputError(f"got {w.size} weights for {n_channels} channels: give one weight per channel")
    if not np.isfinite(w).all() or (w < 0).any():
        raise FusionInputError(f"channel weights must be finite and >= 0, got {w.tolist()}")
    if w.sum() <= 0:
        raise FusionInputError("at least one channel weight must be > 0")
    return w / w.sum()


#: Per-pixel confidence weightings: ``probability`` weighs each channel's maps at a pixel by its own
#: cell probability (sigmoid of its logit), so a channel that sees no cell there barely counts;
#: ``agreement`` by how well its flow agrees with the channels' weighted mean flow there.
CONFIDENCE_MODES: tuple[str, ...] = ("probability", "agreement")
#: Floor of a per-pixel confidence: where no channel is confident the channel weights decide.
CONFIDENCE_FLOOR = 0.05


def _check_arrays(maps: Sequence) -> list[np.ndarray]:
    arrays = [_as_array(m) for m in maps]
    if not arrays:
        raise FusionInputError("no channel maps to fuse: choose at least one channel")
    shape = arrays[0].shape
    for index, array in enumerate(arrays):
        if array.shape != shape:
            raise FusionInputError(
                f"channel {index} maps have shape {array.shape}, channel 0 has {shape}: "
                "all channels of a field must have the same size"
            )
    return arrays


def confidence_weights(arrays: Sequence[np.ndarray], weights: np.ndarray, mode: str) -> np.ndarray:
    """Per-pixel channel weights (K, Y, X) summing to 1 at every pixel: ``weights[k]`` x
    (``CONFIDENCE_FLOOR`` + channel k's confidence at that pixel), see ``CONFIDENCE_MODES``."""
    if mode == "probability":
        confidence = [1.0 / (1.0 + np.exp(-np.clip(a[2], -30, 30))) for a in arrays]
    elif mode == "agreement":
        # Flows are ~5 x unit vectors: squared distances to the consensus lie in [0, ~4].
        consensus = sum(np.float32(w) * a[:2] for w, a in zip(weights, arrays)) / 5.0
        confidence = [np.exp(-(((a[:2] / 5.0) - consensus) ** 2).sum(axis=0)) for a in arrays]
    else:
        raise FusionInputError(f"unknown confidence mode {mode!r}; valid: {', '.join(CONFIDENCE_MODES)}")
    stacked = np.stack([np.float32(w) * (CONFIDENCE_FLOOR + c) for w, c in zip(weights, confidence)])
    return (stacked / np.maximum(stacked.sum(axis=0, keepdims=True), 1e-12)).astype(np.float32)


def fuse_maps(
    maps: Sequence, weights: Sequence[float] | np.ndarray | None = None, confidence: str | None = None
) -> np.ndarray:
    """Weighted mean of K channels' (3, Y, X) maps -> float32 (3, Y, X).

    ``maps`` holds arrays or ChannelMaps records of one shape; ``weights`` (default: equal) are
    normalised to sum to 1, so weights [2, 1] mean "the first channel counts twice".
    ``confidence`` (one of ``CONFIDENCE_MODES``) makes the weights per pixel.
    """
    arrays = _check_arrays(maps)
    w = check_weights(weights, len(arrays))
    fused = np.zeros(arrays[0].shape, np.float32)
    if confidence:
        per_pixel = confidence_weights(arrays, w, confidence)
        for omega, array in zip(per_pixel, arrays):
            fused += omega[np.newaxis] * array.astype(np.float32, copy=False)
        return fused
    for weight, array in zip(w, arrays):
        if weight:
            fused += np.float32(weight) * array.astype(np.float32, copy=False)
    return fused


#: Fusion-parameter methods, simplest first: equal weights, one weight per channel, per-pixel.
FUSION_PARAMETER_METHODS: tuple[str, ...] = ("equal", "weights", "per_pixel")


@dataclass(frozen=True)
class FusionParameters:
    """How to fuse one channel set, fitted on validation fields (``fusion_fitting``) and stored in
    the zoo beside the channel set, as StarDist stores thresholds per model.

    ``weights`` are per channel, in ``channels`` order (sum 1); ``confidence`` is None or one of
    ``CONFIDENCE_MODES``; ``flow_threshold`` 0 turns the flow-error check off. ``cv_f1`` is the
    cross-validated F1@0.5 over the validation fields and ``cv_interval`` its bootstrap 95 %
    interval over fields; ``details`` holds the other methods' scores and the search grid.

    >>> p = FusionParameters("weights", ("a", "b"), (1.0, 0.0), 0.4, 0.0)
    >>> FusionParameters.from_dict(p.to_dict()) == p
    True
    """

    method: str
    channels: tuple[str, ...]
    weights: tuple[float, ...]
    flow_threshold: float
    cellprob_threshold: float
    confidence: str | None = None
    cv_f1: float | None = None
    cv_interval: tuple[float, float] | None = None
    n_fields: int = 0
    details: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.method not in FUSION_PARAMETER_METHODS:
            raise FusionInputError(
                f"unknown fusion-parameter method {self.method!r}; valid: {', '.join(FUSION_PARAMETER_METHODS)}"
            )
        if len(self.weights) != len(self.channels) or not self.channels:
            raise FusionInputError(f"give one weight per channel: {list(self.channels)} vs {list(self.weights)}")
        check_weights(self.weights, len(self.channels))
        if self.confidence is not None and self.confidence not in CONFIDENCE_MODES:
            raise FusionInputError(f"unknown confidence mode {self.confidence!r}; valid: {', '.join(CONFIDENCE_MODES)}")
        if not (np.isfinite(self.flow_threshold) and self.flow_threshold >= 0 and np.isfinite(self.cellprob_threshold)):
            raise FusionInputError("flow_threshold must be >= 0 and cellprob_threshold finite")

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "channels": list(self.channels),
            "weights": [round(float(w), 6) for w in self.weights],
            "flow_threshold": float(self.flow_threshold),
            "cellprob_threshold": float(self.cellprob_threshold),
            "confidence": self.confidence,
            "cv_f1": None if self.cv_f1 is None else float(self.cv_f1),
            "cv_interval": None if self.cv_interval is None else [float(x) for x in self.cv_interval],
            "n_fields": int(self.n_fields),
            "details": self.details,
        }

    @classmethod
    def from_dict(cls, record: dict) -> FusionParameters:
        try:
            interval = record.get("cv_interval")
            return cls(
                method=str(record["method"]),
                channels=tuple(str(c) for c in record["channels"]),
                weights=tuple(float(w) for w in record["weights"]),
                flow_threshold=float(record["flow_threshold"] or 0.0),
                cellprob_threshold=float(record.get("cellprob_threshold", 0.0)),
                confidence=record.get("confidence"),
                cv_f1=None if record.get("cv_f1") is None else float(record["cv_f1"]),
                cv_interval=None if interval is None else (float(interval[0]), float(interval[1])),
                n_fields=int(record.get("n_fields", 0)),
                details=dict(record.get("details") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, FusionInputError):
                raise
            raise FusionInputError(f"not a fusion-parameter record: {exc}") from None

    def weights_for(self, channel_names: Sequence[str]) -> np.ndarray:
        """The weights in the order of ``channel_names`` (which must be exactly this record's channels)."""
        names = [str(n) for n in channel_names]
        if sorted(names) != sorted(self.channels):
            raise FusionInputError(f"these fusion parameters are for channels {list(self.channels)}, not {names}")
        lookup = dict(zip(self.channels, self.weights))
        return np.array([lookup[n] for n in names], dtype=np.float64)


@dataclass(frozen=True)
class FlowFusionResult:
    """Instance labels (Y, X) int32, the fused maps (3, Y, X) and the per-channel maps used."""

    labels: np.ndarray
    fused_maps: np.ndarray
    channel_maps: tuple


def flow_fusion(
    channel_maps: Sequence,
    *,
    diameter: float,
    diam_mean: float,
    weights: Sequence[float] | np.ndarray | None = None,
    flow_threshold: float | None = FUSED_FLOW_THRESHOLD,
    cellprob_threshold: float = 0.0,
    min_size: int = 15,
    confidence: str | None = None,
) -> FlowFusionResult:
    """Fuse the channels' maps and reconstruct instances with Cellpose's dynamics.

    ``diameter`` / ``diam_mean`` set the number of dynamics steps (200 x diameter / diam_mean, as
    Cellpose's ``eval``). ``flow_threshold`` defaults to ``FUSED_FLOW_THRESHOLD`` (see there);
    ``confidence`` weighs channels per pixel (``CONFIDENCE_MODES``).
    """
    # Imported here: fusing maps needs only numpy; reconstruction needs the torch/Cellpose backbone.
    from app.science.backbone import masks_from_maps

    fused = fuse_maps(channel_maps, weights, confidence)
    labels = masks_from_maps(
        fused,
        diameter=diameter,
        diam_mean=diam_mean,
        flow_threshold=flow_threshold,
        cellprob_threshold=cellprob_threshold,
        min_size=min_size,
    )
    return FlowFusionResult(labels=labels, fused_maps=fused, channel_maps=tuple(channel_maps))
