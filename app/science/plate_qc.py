"""Plate QC: fields whose segmentation is implausible for the plate, and reporters that drifted.

* Per field and object: cell count, mean cell area and foreground fraction. A field is flagged when
  a value's robust z-score (median / MAD, scaled by 1.4826 so it matches a standard deviation for
  normal data) is beyond ``z_threshold`` against the other fields of the plate, or against the
  fields of past plates of the same cell line (when there is such a history).
* Per field and channel: the distance of the network's style vector (what the model "sees" in the
  image) from the centroid of its training images' styles, in units of the training spread. Far
  means the reporter or the acquisition changed (exposure, filter, a different stain).

>>> bool(robust_z([10, 11, 9, 10, 0])[-1] < -3.5)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Z_THRESHOLD = 3.5  # Iglewicz & Hoaglin's cut-off for modified z-scores
STYLE_DRIFT_THRESHOLD = 3.0
METRICS = ("count", "mean_area", "foreground_fraction", "contrast")
#: A MAD of 0 (identical fields) would make any difference infinite; below this relative scale
#: differences are not called implausible.
MIN_RELATIVE_SCALE = 0.05


def field_stats(labels: np.ndarray, image: np.ndarray | None = None) -> dict[str, float]:
    """Count, mean area and foreground fraction of a field's objects; with the field's (K, Y, X)
    ``image``, also ``contrast``: the median over channels of mean intensity inside objects over mean
    intensity outside (about 1 when the "objects" are noise, as on an empty or out-of-focus field)."""
    labels = np.asarray(labels)
    count = len(np.unique(labels[labels > 0]))
    foreground = int(np.count_nonzero(labels))
    out = {
        "count": count,
        "mean_area": float(foreground / count) if count else 0.0,
        "foreground_fraction": float(foreground / labels.size) if labels.size else 0.0,
    }
    if image is not None:
        inside = labels > 0
        ratios = []
        for channel in np.asarray(image, dtype=np.float64).reshape(-1, *labels.shape):
            outside = channel[~inside].mean() if (~inside).any() else np.nan
            ratios.append(channel[inside].mean() / outside if inside.any() and outside > 0 else 1.0)
        out["contrast"] = round(float(np.nanmedian(ratios)), 4)
    return out


def _scale(values: np.ndarray) -> tuple[float, float]:
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    return median, max(1.4826 * mad, MIN_RELATIVE_SCALE * abs(median), 1e-9)


def robust_z(values: Sequence[float], reference: Sequence[float] | None = None) -> np.ndarray:
    """Modified z-scores of ``values`` against ``reference`` (default: the values themselves)."""
    arr = np.asarray(values, dtype=np.float64)
    ref = arr if reference is None else np.asarray(reference, dtype=np.float64)
    if ref.size == 0:
        return np.zeros_like(arr)
    median, scale = _scale(ref)
    return np.asarray((arr - median) / scale)


def style_reference(styles: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Centroid and spread (RMS distance to the centroid) of training styles, for the model card."""
    arr = np.asarray(styles, dtype=np.float64)
    centroid = arr.mean(axis=0)
    spread = float(np.sqrt(np.mean(np.sum((arr - centroid) ** 2, axis=1)))) if len(arr) > 1 else 0.0
    return {"mean": [round(float(v), 6) for v in centroid], "spread": round(max(spread, 1e-3), 6), "n": len(arr)}


def style_distance(style: Sequence[float], reference: dict[str, Any]) -> float:
    """Distance of a style from the training centroid, in training spreads."""
    centroid = np.asarray(reference["mean"], dtype=np.float64)
    vector = np.asarray(style, dtype=np.float64)
    if centroid.shape != vector.shape:
        raise ValueError(f"style of length {vector.size} does not fit a reference of length {centroid.size}")
    return float(np.linalg.norm(vector - centroid) / max(float(reference["spread"]), 1e-3))


def plate_qc(
    fields: Sequence[dict[str, Any]],
    *,
    history: dict[str, dict[str, list[float]]] | None = None,
    style_references: dict[str, dict[str, Any]] | None = None,
    z_threshold: float = Z_THRESHOLD,
    style_threshold: float = STYLE_DRIFT_THRESHOLD,
    min_fields: int = 3,
) -> dict[str, Any]:
    """Flags for a plate.

    ``fields``: one dict per field: ``{"field", "well", "stats": {object: field_stats}, "styles":
    {channel: style}}``. ``history``: per object, per metric, the values of past plates' fields.
    ``style_references``: per channel, a ``style_reference``. Returns ``{"flags": [...],
    "flagged_fields": [...], "drifted_channels": [...], "summary": {...}}``.
    """
    flags: list[dict[str, Any]] = []
    objects = sorted({obj for f in fields for obj in f.get("stats", {})})
    for obj in objects:
        for metric in METRICS:
            rows = [f for f in fields if metric in f.get("stats", {}).get(obj, {})]
            values = [float(f["stats"][obj][metric]) for f in rows]
            if len(rows) >= min_fields:
                for i, z in enumerate(robust_z(values)):
                    if abs(z) > z_threshold:
                        flags.append(
                            {
                                "type": "field_outlier",
                                "against": "plate",
                                "field": rows[i]["field"],
                                "well": rows[i].get("well"),
                                "object": obj,
                                "metric": metric,
                                "value": round(values[i], 4),
                                "z": round(float(z), 2),
                            }
                        )
            past = (history or {}).get(obj, {}).get(metric) or []
            if len(past) >= min_fields:
                for i, z in enumerate(robust_z(values, past)):
                    if abs(z) > z_threshold:
                        flags.append(
                            {
                                "type": "field_outlier",
                                "against": "past plates",
                                "field": rows[i]["field"],
                                "well": rows[i].get("well"),
                                "object": obj,
                                "metric": metric,
                                "value": round(values[i], 4),
                                "z": round(float(z), 2),
                            }
                        )
    drift: dict[str, list[float]] = {}
    for f in fields:
        for channel, style in (f.get("styles") or {}).items():
            ref = (style_references or {}).get(channel)
            if not ref:
                continue
            try:
                distance = style_distance(style, ref)
            except ValueError:
                continue
            drift.setdefault(channel, []).append(distance)
            if distance > style_threshold:
                flags.append(
                    {
                        "type": "style_drift",
                        "field": f["field"],
                        "well": f.get("well"),
                        "channel": channel,
                        "distance": round(distance, 2),
                        "threshold": style_threshold,
                    }
                )
    drifted = sorted({fl["channel"] for fl in flags if fl["type"] == "style_drift"})
    flagged = sorted({fl["field"] for fl in flags if fl["type"] == "field_outlier"})
    return {
        "flags": flags,
        "flagged_fields": flagged,
        "drifted_channels": drifted,
        "summary": {
            "fields": len(fields),
            "flagged_fields": len(flagged),
            "drifted_channels": len(drifted),
            "style_distance": {c: round(float(np.median(v)), 2) for c, v in drift.items()},
            "z_threshold": z_threshold,
            "style_threshold": style_threshold,
        },
    }
