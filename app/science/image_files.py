"""Reading and writing TIFF fields and label images, with checks a lab person can act on.

``read_image`` accepts what microscopes and image tools write: plain TIFF (2-D or multi-page),
OME-TIFF (channel names from the OME-XML), ImageJ hyperstacks (channel names from slice labels)
and RGB TIFF. It returns the field as (C, Y, X). It refuses, with a message that says what to send
instead: z-stacks, time series, more than one non-spatial axis, empty images, images whose header
declares more pixels than ``max_pixels`` (checked BEFORE decoding: a small compressed file can
declare gigabytes), complex or boolean pixels, NaN/inf values, and bytes that are not a TIFF.

>>> data = np.arange(2 * 4 * 5, dtype=np.uint16).reshape(2, 4, 5)
>>> image = read_image(image_to_tiff_bytes(data, ["GFP", "mCherry"]))
>>> image.data.shape, image.channel_names
((2, 4, 5), ('GFP', 'mCherry'))
"""

from __future__ import annotations

import io
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile

#: Default decoded-size limit: 64 M values (all channels together), e.g. 4 channels of 4000 x 4000.
DEFAULT_MAX_PIXELS = 64_000_000
#: More channels than this is almost certainly a stack read as channels.
DEFAULT_MAX_CHANNELS = 16

#: Axes tifffile reports that can hold channels: C channel, S samples (RGB), E spectral lambda,
#: I / Q pages of a plain multi-page or shaped TIFF without further metadata.
_CHANNEL_AXES = "CSEIQ"
_AXIS_NAMES = {
    "Z": "a z-stack",
    "T": "a time series",
    "R": "a tiled/region series",
    "A": "a multi-angle acquisition",
    "P": "a phase series",
    "H": "a lifetime histogram",
    "L": "an exposure series",
    "V": "a multi-view acquisition",
    "M": "a mosaic",
}
_SUPPORTED_KINDS = "uif"
#: tifffile parses untrusted bytes: on garbled headers it raises struct.error, KeyError, RuntimeError,
#: ... (seen in fuzzing); any of them means "not a readable TIFF", never a server error.
_HEADER_ERRORS = (Exception,)  # unsigned, signed integer and float pixels

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO


class ImageReadError(ValueError):
    """The file cannot be used as an image field (the message says why and what to send instead)."""


@dataclass(frozen=True)
class ChannelImage:
    """A field as (C, Y, X) and its channel names when the file carries them."""

    data: np.ndarray
    channel_names: tuple[str, ...] | None = None

    @property
    def n_channels(self) -> int:
        return int(self.data.shape[0])


# --------------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------------


def _source_size(source: Source) -> int | None:
    if isinstance(source, bytes | bytearray | memoryview):
        return len(source)
    if isinstance(source, str | os.PathLike):
        return os.path.getsize(source)
    return None


def _open(source: Source, max_bytes: int | None) -> tifffile.TiffFile:
    if isinstance(source, str | os.PathLike) and not Path(source).is_file():
        raise ImageReadError(f"no such file: {os.fspath(source)}")
    size = _source_size(source)
    if size == 0:
        raise ImageReadError("the file is empty (0 bytes)")
    if max_bytes is not None and size is not None and size > max_bytes:
        raise ImageReadError(f"the file is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.1f} MB")
    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(bytes(source))
    try:
        return tifffile.TiffFile(source)
    except tifffile.TiffFileError as error:
        raise ImageReadError(f"not a readable TIFF file ({error}); send a TIFF or OME-TIFF") from None
    except _HEADER_ERRORS as error:
        raise ImageReadError(f"not a readable TIFF file ({type(error).__name__}: {error})") from None


def _decode(series: tifffile.TiffPageSeries) -> np.ndarray:
    try:
        return series.asarray()
    except Exception as error:  # noqa: BLE001 - codecs (imagecodecs, zlib, lzw) raise their own types
        raise ImageReadError(f"the TIFF's pixel data is corrupt or uses an unsupported compression ({error})") from None


# --------------------------------------------------------------------------------------------
# Axes
# --------------------------------------------------------------------------------------------


def _describe(axis: str, size: int) -> str:
    what = _AXIS_NAMES.get(axis, f"an extra '{axis}' dimension")
    return f"{what} with {size} planes"


def _plan_axes(axes: str, shape: tuple[int, ...], max_channels: int) -> tuple[str | None, str]:
    """Which axis (if any) holds channels; rejects everything CellFuse cannot segment.

    Returns ``(channel_axis, kept_axes)`` where ``kept_axes`` are the non-singleton axes in file
    order (singletons are squeezed).
    """
    if any(size == 0 for size in shape):
        raise ImageReadError(f"the image is empty (shape {shape})")
    if len(set(axes)) != len(axes):
        # tifffile names a degenerate series (e.g. 1x1x1) with a repeated letter such as 'XYX'.
        raise ImageReadError(f"the image's axes are ambiguous ('{axes}', shape {shape}); send a 2-D field")
    if "Y" not in axes or "X" not in axes:
        raise ImageReadError(f"the image has no Y and X axes (axes '{axes}', shape {shape})")
    extra = [(a, s) for a, s in zip(axes, shape, strict=True) if a not in "YX" and s > 1]
    for axis, size in extra:
        if axis == "Z":
            raise ImageReadError(
                f"this file is a z-stack with {size} planes; CellFuse segments 2-D fields: "
                "send one plane or a projection"
            )
        if axis == "T":
            raise ImageReadError(
                f"this file is a time series with {size} time points; CellFuse segments 2-D "
                "fields: send one time point per image"
            )
        if axis not in _CHANNEL_AXES:
            raise ImageReadError(
                f"this file is {_describe(axis, size)}; CellFuse segments 2-D multi-channel "
                "fields (C, Y, X): send one 2-D field per image"
            )
    if len(extra) > 1:
        dims = ", ".join(f"{a}={s}" for a, s in extra)
        raise ImageReadError(
            f"this file has {len(extra)} non-spatial dimensions ({dims}); a field may have only "
            "one (its channels): send channels as (C, Y, X)"
        )
    kept = "".join(a for a, s in zip(axes, shape, strict=True) if a in "YX" or s > 1)
    if not extra:
        return None, kept
    axis, size = extra[0]
    if size > max_channels:
        raise ImageReadError(
            f"this file has {size} planes along '{axis}'; CellFuse accepts at most {max_channels} "
            "channels: if the planes are a z-stack or time series, send one 2-D field per image"
        )
    return axis, kept


def _to_cyx(data: np.ndarray, axes: str, channel_axis: str | None, kept: str) -> np.ndarray:
    squeezed = data.reshape([s for a, s in zip(axes, data.shape, strict=True) if a in kept])
    order = ([kept.index(channel_axis)] if channel_axis else []) + [kept.index("Y"), kept.index("X")]
    out = np.transpose(squeezed, order)
    return np.ascontiguousarray(out if channel_axis else out[np.newaxis])


def _check_dtype(dtype: np.dtype) -> None:
    if dtype == np.bool_:
        raise ImageReadError(
            "the image is binary (1-bit); that looks like a mask, not a fluorescence field: "
            "send masks as label images (read_labels)"
        )
    if dtype.kind not in _SUPPORTED_KINDS:
        raise ImageReadError(f"unsupported pixel type {dtype}; send 8/16/32-bit integer or 16/32/64-bit float pixels")


# --------------------------------------------------------------------------------------------
# Channel names
# --------------------------------------------------------------------------------------------


def _ome_channel_names(xml: str | None) -> list[str] | None:
    if not xml:
        return None
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None  # broken metadata should not make good pixels unreadable
    for image in root.iter():
        if image.tag.rsplit("}", 1)[-1] != "Image":
            continue
        for pixels in image:
            if pixels.tag.rsplit("}", 1)[-1] != "Pixels":
                continue
            channels = [c for c in pixels if c.tag.rsplit("}", 1)[-1] == "Channel"]
            return [c.get("Name") or c.get("ID") or "" for c in channels]
        return None  # only the first Image is read
    return None


def _channel_names(tif: tifffile.TiffFile, n_channels: int, channel_axis: str | None) -> tuple[str, ...] | None:
    names: list[str] | None = None
    if tif.is_ome:
        names = _ome_channel_names(tif.ome_metadata)
    elif tif.is_imagej and tif.imagej_metadata:
        labels = tif.imagej_metadata.get("Labels")
        names = list(labels) if isinstance(labels, list | tuple) else None
    if channel_axis is None and names and len(names) == 1:
        return (str(names[0]),) if names[0] else None
    if not names or len(names) != n_channels or not all(names):
        return None
    return tuple(str(n) for n in names)


# --------------------------------------------------------------------------------------------
# Public API: images
# --------------------------------------------------------------------------------------------


def read_image(
    source: Source,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = None,
    max_channels: int = DEFAULT_MAX_CHANNELS,
) -> ChannelImage:
    """Read a 2-D field from a TIFF / OME-TIFF / ImageJ TIFF as (C, Y, X).

    ``source`` is a path, the file's bytes or a binary file object. ``max_pixels`` limits the
    decoded size (all channels together) and is checked from the header before any pixel is
    decoded; ``max_bytes`` limits the encoded size. float16 pixels come back as float32; other
    supported dtypes (u)int8/16/32/64 and float32/64 are kept.
    """
    with _open(source, max_bytes) as tif:
        try:
            all_series = tif.series
            series = all_series[0] if all_series else None
            axes, shape = (series.axes, tuple(int(s) for s in series.shape)) if series else ("", ())
            dtype = np.dtype(series.dtype) if series else None
        except _HEADER_ERRORS as error:
            raise ImageReadError(f"the TIFF's header is damaged ({type(error).__name__}: {error})") from None
        if series is None or dtype is None:
            raise ImageReadError("the TIFF holds no image")
        channel_axis, kept = _plan_axes(axes, shape, max_channels)
        _check_dtype(dtype)
        n_values = int(np.prod(shape, dtype=np.int64))
        if n_values > max_pixels:
            raise ImageReadError(
                f"the image declares {n_values:,} pixel values (shape {shape}); the limit is "
                f"{max_pixels:,}: send a smaller field or a crop"
            )
        data = _decode(series)
        if data.shape != shape:
            raise ImageReadError(f"the TIFF's pixel data ({data.shape}) does not match its header ({shape})")
        cyx = _to_cyx(data, axes, channel_axis, kept)
        names = _channel_names(tif, cyx.shape[0], channel_axis)
    if cyx.dtype == np.float16:
        cyx = cyx.astype(np.float32)
    if cyx.dtype.kind == "f" and not np.isfinite(cyx).all():
        raise ImageReadError("the image contains NaN or infinite values; replace them before sending")
    return ChannelImage(data=cyx, channel_names=names)


def _check_cyx(data: np.ndarray, channel_names: Sequence[str] | None) -> np.ndarray:
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[np.newaxis]
    if data.ndim != 3 or 0 in data.shape:
        raise ImageReadError(f"an image to write must be (C, Y, X) or (Y, X); got shape {data.shape}")
    _check_dtype(data.dtype)
    if channel_names is not None and len(channel_names) != data.shape[0]:
        raise ImageReadError(f"{len(channel_names)} channel names given for {data.shape[0]} channels")
    return data


def write_image(
    target: str | os.PathLike[str] | BinaryIO,
    data: np.ndarray,
    channel_names: Sequence[str] | None = None,
) -> None:
    """Write a (C, Y, X) field as a zlib-compressed OME-TIFF, with channel names when given."""
    data = _check_cyx(data, channel_names)
    metadata: dict[str, object] = {"axes": "CYX"}
    if channel_names is not None:
        metadata["Channel"] = {"Name": [str(n) for n in channel_names]}
    tifffile.imwrite(target, data, ome=True, metadata=metadata, compression="zlib")


def image_to_tiff_bytes(data: np.ndarray, channel_names: Sequence[str] | None = None) -> bytes:
    """The OME-TIFF bytes ``write_image`` would write."""
    buffer = io.BytesIO()
    write_image(buffer, data, channel_names)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Public API: label images
# --------------------------------------------------------------------------------------------


def _as_labels(data: np.ndarray, what: str) -> np.ndarray:
    """Validate and convert to int32 (int64 if ids do not fit) instance labels."""
    if data.ndim != 2:
        raise ImageReadError(f"{what} must be a 2-D label image (Y, X); got shape {data.shape}")
    if data.dtype == np.bool_:
        raise ImageReadError(
            f"{what} is a binary mask; send an instance label image (0 = background, 1, 2, ... = one id per object)"
        )
    if data.dtype.kind == "f":
        if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
            raise ImageReadError(f"{what} holds non-integer values; a label image holds integer object ids")
    elif data.dtype.kind not in "ui":
        raise ImageReadError(f"{what} has unsupported pixel type {data.dtype}; send integer ids")
    if data.size and data.min() < 0:
        raise ImageReadError(f"{what} has negative ids; object ids must be >= 0 (0 = background)")
    top = int(data.max(initial=0))
    if top > np.iinfo(np.int64).max:  # uint64 ids >= 2**63 would wrap to negative ids
        raise ImageReadError(f"{what} has object ids up to {top}; ids must be below 2**63")
    return data.astype(np.int32 if top <= np.iinfo(np.int32).max else np.int64)


def read_labels(source: Source, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None) -> np.ndarray:
    """Read a 2-D instance label image (0 = background) as int32 (Y, X).

    Float files are accepted when every value is an integer; multi-channel files, negative ids and
    binary (bool) masks are refused.
    """
    try:
        image = read_image(source, max_pixels=max_pixels, max_bytes=max_bytes)
    except ImageReadError as error:
        raise ImageReadError(f"label image: {error}") from None
    if image.n_channels != 1:
        raise ImageReadError(f"the label image has {image.n_channels} channels; send one 2-D label image (Y, X)")
    return _as_labels(image.data[0], "the label image")


def _label_dtype(labels: np.ndarray) -> np.ndarray:
    labels = _as_labels(np.asarray(labels), "labels to write")
    top = int(labels.max(initial=0))
    if top > np.iinfo(np.uint32).max:
        raise ImageReadError(f"label ids up to {top} do not fit a 32-bit label image")
    return labels.astype(np.uint16 if top <= np.iinfo(np.uint16).max else np.uint32)


def write_labels(target: str | os.PathLike[str] | BinaryIO, labels: np.ndarray) -> None:
    """Write a 2-D instance label image as zlib-compressed TIFF: uint16, or uint32 above 65535 ids."""
    tifffile.imwrite(target, _label_dtype(labels), compression="zlib", photometric="minisblack")


def labels_to_tiff_bytes(labels: np.ndarray) -> bytes:
    """The TIFF bytes ``write_labels`` would write."""
    buffer = io.BytesIO()
    write_labels(buffer, labels)
    return buffer.getvalue()


def content_digest(image: np.ndarray, labels: np.ndarray | None = None) -> str:
    """sha256 of what an image and its mask *show*, not of the file that carried them.

    The same pixels re-encoded (another compression, a fresh OME UUID, uint8 vs uint16 holding the
    same values) give the same digest; so do label images that differ only in which id each object
    got, because ids are renumbered in raster order of their first pixel.

    >>> a = np.array([[0, 5], [5, 2]])
    >>> content_digest(np.ones((2, 2), np.uint8), a) == content_digest(np.ones((2, 2), np.uint16), a * 7 % 11)
    True
    >>> content_digest(np.ones((2, 2)), a) == content_digest(np.zeros((2, 2)), a)
    False
    """
    import hashlib

    digest = hashlib.sha256()
    pixels = np.ascontiguousarray(np.asarray(image), dtype=np.float64)
    digest.update(repr(pixels.shape).encode())
    digest.update(pixels.tobytes())
    if labels is not None:
        flat = np.asarray(labels).ravel()
        ids, first, inverse = np.unique(flat, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # ids ranked by where each object first appears
        rank = np.empty(len(ids), np.int64)
        rank[order] = np.arange(len(ids))
        background = np.flatnonzero(ids == 0)
        canonical = rank[inverse] + 1
        if background.size:
            canonical[inverse == background[0]] = 0
        digest.update(b"labels")
        digest.update(repr(np.asarray(labels).shape).encode())
        digest.update(np.ascontiguousarray(canonical, dtype=np.int64).tobytes())
    return digest.hexdigest()
