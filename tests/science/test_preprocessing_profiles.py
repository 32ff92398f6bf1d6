"""Stored illumination profiles and plate percentiles (what the jobs store and apply)."""

import numpy as np
import pytest

from app.science.preprocessing import (
    IlluminationModel,
    PreprocessingError,
    channel_of,
    illumination_from_tiff,
    illumination_to_tiff,
    plate_percentiles,
)


def test_a_profile_round_trips_through_its_tiff():
    rng = np.random.default_rng(0)
    flat = (0.5 + rng.random((2, 16, 24))).astype(np.float32)
    flat /= flat.mean(axis=(1, 2), keepdims=True)
    dark = rng.random((2, 16, 24)).astype(np.float32)
    back = illumination_from_tiff(illumination_to_tiff(IlluminationModel(flat, dark, method="basic")))
    assert np.allclose(back.flatfield, flat, atol=1e-5) and np.allclose(back.darkfield, dark)
    one = channel_of(back, 1)
    assert one.flatfield.shape == (1, 16, 24) and np.allclose(one.flatfield[0], flat[1], atol=1e-5)


@pytest.mark.parametrize(
    "bad", [np.zeros((8, 8), np.float32), np.full((8, 8), np.nan, np.float32), np.ones((3, 2, 8, 8), np.float32)]
)
def test_a_flatfield_that_cannot_be_one_is_refused(bad):
    import io

    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, bad)
    with pytest.raises(PreprocessingError):
        illumination_from_tiff(buffer.getvalue())
    with pytest.raises(PreprocessingError):
        illumination_from_tiff(b"not a tiff")


def test_plate_percentiles_keep_a_dim_field_dim():
    bright, dim = np.full((1, 8, 8), 1000.0), np.full((1, 8, 8), 100.0)
    bright[0, 0, 0] = 0.0
    ((low, high),) = plate_percentiles([bright, dim], 0.0, 100.0)
    assert (low, high) == (0.0, 1000.0)
    assert (dim[0] - low).max() / (high - low) == pytest.approx(0.1)
