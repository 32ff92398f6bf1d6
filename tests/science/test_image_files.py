"""Tests for app.science.image_files: round trips, channel names, and every refusal with its message."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

from app.science.image_files import (
    ChannelImage,
    ImageReadError,
    image_to_tiff_bytes,
    labels_to_tiff_bytes,
    read_image,
    read_labels,
    write_image,
    write_labels,
)


def _tiff(data: np.ndarray, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tifffile warns about deliberately odd files
        tifffile.imwrite(buffer, data, **kwargs)
    return buffer.getvalue()


def _field(c: int = 3, y: int = 24, x: int = 32, dtype: type = np.uint16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 4000, (c, y, x)).astype(dtype)


# --------------------------------------------------------------------------------------------
# Images that are accepted
# --------------------------------------------------------------------------------------------


def test_ome_round_trip_with_channel_names(tmp_path: Path) -> None:
    data = _field()
    path = tmp_path / "field.ome.tif"
    write_image(path, data, ["GFP", "mCherry", "Cy5"])
    image = read_image(path)
    assert isinstance(image, ChannelImage)
    assert image.channel_names == ("GFP", "mCherry", "Cy5")
    assert image.data.dtype == np.uint16 and image.n_channels == 3
    np.testing.assert_array_equal(image.data, data)
    # the same through bytes and through a file object
    blob = path.read_bytes()
    np.testing.assert_array_equal(read_image(blob).data, data)
    with path.open("rb") as handle:
        assert read_image(handle).channel_names == ("GFP", "mCherry", "Cy5")


def test_write_without_names_and_2d_input() -> None:
    data = _field(1)[0].astype(np.float32)
    image = read_image(image_to_tiff_bytes(data))
    assert image.data.shape == (1, 24, 32) and image.data.dtype == np.float32
    np.testing.assert_array_equal(image.data[0], data)


def test_plain_2d_tiff_is_one_channel() -> None:
    data = _field(1)[0]
    image = read_image(_tiff(data))
    assert image.data.shape == (1, 24, 32) and image.channel_names is None


def test_plain_multipage_tiff_gives_channels() -> None:
    data = _field(4)
    image = read_image(_tiff(data, metadata=None))  # pages, no metadata: axes 'IYX'
    np.testing.assert_array_equal(image.data, data)
    image = read_image(_tiff(data))  # tifffile's shaped default
    np.testing.assert_array_equal(image.data, data)


def test_rgb_samples_become_channels() -> None:
    rgb = np.random.default_rng(3).integers(0, 255, (20, 30, 3)).astype(np.uint8)
    image = read_image(_tiff(rgb, photometric="rgb"))
    assert image.data.shape == (3, 20, 30)
    np.testing.assert_array_equal(image.data[2], rgb[..., 2])


def test_imagej_hyperstack_with_channel_labels_and_singleton_z() -> None:
    data = _field(2)[:, np.newaxis]  # (C, Z=1, Y, X) written as ImageJ ZCYX after a transpose
    zcyx = np.ascontiguousarray(np.transpose(data, (1, 0, 2, 3)))
    image = read_image(_tiff(zcyx, imagej=True, metadata={"axes": "ZCYX", "Labels": ["DAPI-free", "Tubulin"]}))
    assert image.data.shape == (2, 24, 32)
    assert image.channel_names == ("DAPI-free", "Tubulin")


def test_float16_is_widened_and_ints_kept() -> None:
    assert read_image(_tiff(np.ones((8, 8), np.float16))).data.dtype == np.float32
    assert read_image(_tiff(np.ones((8, 8), np.int32))).data.dtype == np.int32


# --------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------


def test_z_stack_is_refused_with_an_actionable_message() -> None:
    stack = np.zeros((12, 16, 16), np.uint16)
    with pytest.raises(ImageReadError, match="z-stack with 12 planes.*one plane or a projection"):
        read_image(_tiff(stack, imagej=True, metadata={"axes": "ZYX"}))


def test_time_series_is_refused() -> None:
    with pytest.raises(ImageReadError, match="time series with 5 time points"):
        read_image(_tiff(np.zeros((5, 16, 16), np.uint8), ome=True, metadata={"axes": "TYX"}))


def test_other_axes_and_two_channel_like_axes_are_refused() -> None:
    with pytest.raises(ImageReadError, match="multi-angle"):
        read_image(_tiff(np.zeros((4, 16, 16), np.uint8), metadata={"axes": "AYX"}))
    with pytest.raises(ImageReadError, match="2 non-spatial dimensions.*C=2, S=3"):
        read_image(_tiff(np.zeros((2, 3, 16, 16), np.uint8), metadata={"axes": "CSYX"}))


def test_too_many_planes_are_refused() -> None:
    with pytest.raises(ImageReadError, match="40 planes.*at most 16 channels"):
        read_image(_tiff(np.zeros((40, 8, 8), np.uint8), metadata=None))


def test_size_limit_is_checked_from_the_header_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    blob = _tiff(np.zeros((2, 1500, 1500), np.uint16), compression="zlib")
    assert len(blob) < 200_000  # a small file that declares 4.5 M values
    decoded: list[bool] = []
    original = tifffile.TiffPageSeries.asarray

    def spy(self: tifffile.TiffPageSeries, *args: object, **kwargs: object) -> np.ndarray:
        decoded.append(True)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", spy)
    with pytest.raises(ImageReadError, match="declares 4,500,000 pixel values.*limit is 1,000,000"):
        read_image(blob, max_pixels=1_000_000)
    assert decoded == []
    assert read_image(blob).data.shape == (2, 1500, 1500) and decoded == [True]


def test_byte_limit() -> None:
    blob = _tiff(_field())
    with pytest.raises(ImageReadError, match="limit is"):
        read_image(blob, max_bytes=len(blob) - 1)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (np.zeros((16, 16), np.complex64), "unsupported pixel type complex64"),
        (np.zeros((16, 16), bool), "binary"),
        (np.full((4, 4), np.nan, np.float32), "NaN"),
    ],
)
def test_unsupported_pixels_are_refused(data: np.ndarray, fragment: str) -> None:
    with pytest.raises(ImageReadError, match=fragment):
        read_image(_tiff(data))


def test_empty_and_non_tiff_and_corrupt_input(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="empty"):
        read_image(_tiff(np.zeros((0, 16), np.uint8)))
    with pytest.raises(ImageReadError, match="empty"):
        read_image(b"")
    with pytest.raises(ImageReadError, match="not a readable TIFF"):
        read_image(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "missing.tif")
    # a valid header whose compressed pixel data is garbage
    blob = bytearray(_tiff(np.random.default_rng(0).integers(0, 60000, (64, 64)).astype(np.uint16), compression="zlib"))
    start = blob.index(b"\x78")  # zlib stream header follows the 8-byte TIFF header
    blob[start : start + 200] = bytes(range(200))
    with pytest.raises(ImageReadError, match="corrupt|not a readable"):
        read_image(bytes(blob))


def test_write_image_checks_its_input(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="2 channel names given for 3 channels"):
        write_image(tmp_path / "x.tif", _field(), ["a", "b"])
    with pytest.raises(ImageReadError, match=r"\(C, Y, X\)"):
        write_image(tmp_path / "x.tif", np.zeros((1, 2, 3, 4), np.uint8))


# --------------------------------------------------------------------------------------------
# Label images
# --------------------------------------------------------------------------------------------


def test_labels_round_trip_uint16_and_uint32(tmp_path: Path) -> None:
    labels = np.zeros((32, 32), np.int32)
    labels[2:10, 2:10] = 1
    labels[12:20, 12:20] = 65535
    blob = labels_to_tiff_bytes(labels)
    with tifffile.TiffFile(io.BytesIO(blob)) as tif:
        assert tif.pages[0].dtype == np.uint16 and tif.pages[0].compression == 8  # zlib
    back = read_labels(blob)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back, labels)
    labels[20:30, 20:30] = 70_000
    path = tmp_path / "labels.tif"
    write_labels(path, labels)
    assert tifffile.imread(path).dtype == np.uint32
    np.testing.assert_array_equal(read_labels(path), labels)
    with (tmp_path / "handle.tif").open("wb") as handle:
        write_labels(handle, labels)
    np.testing.assert_array_equal(read_labels(tmp_path / "handle.tif"), labels)


def test_float_labels_with_integer_values_are_accepted() -> None:
    labels = np.array([[0, 1], [2, 2]], np.float32)
    np.testing.assert_array_equal(read_labels(_tiff(labels)), labels.astype(np.int32))


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (np.array([[0, 1.5], [2, 2]], np.float32), "non-integer"),
        (np.array([[0, -1], [2, 2]], np.int16), "negative"),
        (np.zeros((2, 8, 8), np.uint16), "2 channels"),
        (np.zeros((8, 8), bool), "binary"),
        (np.zeros((3, 8, 8), np.uint16), "label image"),
    ],
)
def test_bad_label_images_are_refused(data: np.ndarray, fragment: str) -> None:
    with pytest.raises(ImageReadError, match=fragment):
        read_labels(_tiff(data))


def test_write_labels_refuses_bad_labels(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="negative"):
        write_labels(tmp_path / "x.tif", np.array([[-1, 0]]))
    with pytest.raises(ImageReadError, match="2-D"):
        write_labels(tmp_path / "x.tif", np.zeros((2, 2, 2), np.int32))


def test_truncated_and_flipped_bytes_only_ever_raise_image_read_error() -> None:
    good = image_to_tiff_bytes(_field(2, 16, 16), ["a", "b"])
    rng = np.random.default_rng(3)
    variants = [good[:n] for n in range(1, len(good), max(1, len(good) // 60))]
    for _ in range(60):
        damaged = bytearray(good)
        for position in rng.integers(0, len(good), 4):
            damaged[position] = int(rng.integers(256))
        variants.append(bytes(damaged))
    outcomes = {"read": 0, "refused": 0}
    for blob in variants:
        try:
            image = read_image(blob)
        except ImageReadError:
            outcomes["refused"] += 1
        else:
            assert image.data.ndim == 3
            outcomes["read"] += 1
    assert outcomes["refused"] > 10
