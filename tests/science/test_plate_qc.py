"""Plate QC: robust z-scores flag an implausible field against the plate and against past plates;
style distances flag a drifted reporter."""

import numpy as np
import pytest

from app.science.plate_qc import field_stats, plate_qc, robust_z, style_distance, style_reference


def _labels(n: int, size: int = 6, shape=(96, 96)) -> np.ndarray:
    out = np.zeros(shape, np.int32)
    for i in range(n):
        y, x = divmod(i, 8)
        out[y * 11 : y * 11 + size, x * 11 : x * 11 + size] = i + 1
    return out


def test_field_stats_and_contrast():
    labels = _labels(4)
    image = np.full((2, 96, 96), 100.0)
    image[:, labels > 0] = 400.0
    stats = field_stats(labels, image)
    assert stats["count"] == 4 and stats["mean_area"] == 36 and stats["contrast"] == pytest.approx(4.0)
    assert field_stats(np.zeros((8, 8), int))["count"] == 0


def test_planted_empty_field_is_flagged_against_the_plate_and_past_plates():
    rng = np.random.default_rng(0)
    fields = [
        {"field": f"A01-{i}", "well": "A01", "stats": {"nuclei": field_stats(_labels(int(rng.integers(28, 33))))}}
        for i in range(7)
    ]
    fields.append({"field": "A01-7", "well": "A01", "stats": {"nuclei": field_stats(_labels(0))}})
    qc = plate_qc(fields)
    assert qc["flagged_fields"] == ["A01-7"]
    assert {f["metric"] for f in qc["flags"]} >= {"count", "foreground_fraction"}
    # A whole plate of half-full fields looks normal against itself but not against past plates.
    half = [{"field": f"B01-{i}", "well": "B01", "stats": {"nuclei": field_stats(_labels(12))}} for i in range(4)]
    assert plate_qc(half)["flagged_fields"] == []
    history = {"nuclei": {m: [f["stats"]["nuclei"][m] for f in fields[:7]] for m in ("count", "mean_area")}}
    qc = plate_qc(half, history=history)
    assert qc["flagged_fields"] == [f["field"] for f in half]
    assert all(f["against"] == "past plates" for f in qc["flags"])


def test_drifted_channel_is_flagged():
    rng = np.random.default_rng(1)
    centre = rng.normal(size=64)
    centre /= np.linalg.norm(centre)
    training = [(centre + rng.normal(scale=0.02, size=64)) for _ in range(20)]
    reference = style_reference(training)
    same = centre + rng.normal(scale=0.02, size=64)
    other = rng.normal(size=64)
    other /= np.linalg.norm(other)
    assert style_distance(same, reference) < 2
    assert style_distance(other, reference) > 3
    fields = [
        {"field": "A01-0", "styles": {"nuclei:GFP": same.tolist(), "nuclei:RFP": same.tolist()}},
        {"field": "A01-1", "styles": {"nuclei:GFP": same.tolist(), "nuclei:RFP": other.tolist()}},
    ]
    qc = plate_qc(fields, style_references={"nuclei:GFP": reference, "nuclei:RFP": reference})
    assert qc["drifted_channels"] == ["nuclei:RFP"]
    assert [f["field"] for f in qc["flags"]] == ["A01-1"]


def test_robust_z_ignores_one_outlier_in_its_scale():
    z = robust_z([10, 10, 11, 9, 10, 1000])
    assert abs(z[0]) < 1 and z[-1] > 100
