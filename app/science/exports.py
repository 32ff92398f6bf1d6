"""Result exports: per-object measurements (CSV), overlay/composite previews (PNG), ImageJ ROI sets.

Pure functions from arrays to rows or bytes; the API and workers decide where the bytes go.

Conventions:

- A multi-channel field is (C, Y, X); a label image is (Y, X) int, 0 = background.
- Measurement rows are plain dicts of Python ``str``/``int``/``float`` (JSON-ready). Bounding boxes
  follow scikit-image: ``bbox_min_*`` inclusive, ``bbox_max_*`` exclusive. Centroids are in pixel
  coordinates (row, column) of the pixel centres.
- Every row carries both ``nucleus_label`` and ``cell_label``, so that a table can be grouped by
  either: on a nucleus row ``nucleus_label`` is its own label and ``cell_label`` the cell it lies in
  (the cell with the largest overlap, 0 if none); on a cell row ``cell_label`` is its own label and
  ``nucleus_label`` the nucleus with the largest overlap inside it (0 if none).
- ROI polygons trace pixel edges (ImageJ's corner-origin coordinates), so a polygon's area equals
  the object's pixel count for an object without holes, like ImageJ's own wand tool.

Worked example (one 2x2 nucleus inside a 4x4 cell, one channel "GFP" equal to 1 everywhere)::

    rows = measure_cells(nuclei, cells, image, ["GFP"])
    rows[0] -> {"object": "nucleus", "label": 1, "area": 4, ..., "mean_GFP": 1.0,
                "integrated_GFP": 4.0, "nucleus_label": 1, "cell_label": 7}
    rows[1] -> {"object": "cell", "label": 7, "area": 16, ..., "integrated_GFP": 16.0,
                "nucleus_label": 1, "cell_label": 7}
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import overload

import numpy as np
from PIL import Image
from roifile import ROI_TYPE, ImagejRoi
from scipy import ndimage
from skimage.measure import find_contours, regionprops, regionprops_table
from skimage.segmentation import find_boundaries

#: Columns present on every measurement row, in CSV order; channel columns follow, then the pairing.
GEOMETRY_COLUMNS: tuple[str, ...] = (
    "object",
    "label",
    "area",
    "centroid_y",
    "centroid_x",
    "bbox_min_y",
    "bbox_min_x",
    "bbox_max_y",
    "bbox_max_x",
)
PAIRING_COLUMNS: tuple[str, ...] = ("nucleus_label", "cell_label")

#: Outline colours (RGB) of the overlay: neither is grey, so an outline never hides in the image.
NUCLEUS_OUTLINE_RGB: tuple[int, int, int] = (255, 255, 0)  # yellow
CELL_OUTLINE_RGB: tuple[int, int, int] = (255, 0, 255)  # magenta

#: Colours of the composite's first four channels (Fiji's default composite order).
COMPOSITE_RGB: tuple[tuple[float, float, float], ...] = (
    (1.0, 0.0, 0.0),
    (0.0, 1.0, 0.0),
    (0.0, 0.0, 1.0),
    (0.6, 0.6, 0.6),  # grey, dimmed so that it does not wash out the three colours
)

_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_]+")


class ExportInputError(ValueError):
    """Arrays or options that cannot be exported (wrong shapes, dtypes or names)."""


# ----------------------------------------------------------------------------------------------
# validation helpers


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3:
        raise ExportInputError(
            f"the image must be (channels, Y, X); got an array with shape {image.shape}. "
            "Add a channel axis for a single-channel image."
        )
    if not (np.issubdtype(image.dtype, np.number) and not np.iscomplexobj(image)):
        raise ExportInputError(f"the image must hold real numbers; got dtype {image.dtype}")
    return image


@overload
def _check_labels(labels: np.ndarray, shape: tuple[int, int] | None, what: str) -> np.ndarray: ...
@overload
def _check_labels(labels: None, shape: tuple[int, int] | None, what: str) -> None: ...
@overload
def _check_labels(labels: np.ndarray | None, shape: tuple[int, int] | None, what: str) -> np.ndarray | None: ...
def _check_labels(labels: np.ndarray | None, shape: tuple[int, int] | None, what: str) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ExportInputError(f"the {what} label image must be 2-D (Y, X); got shape {labels.shape}")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ExportInputError(
            f"the {what} label image must hold integer ids (0 = background); got dtype {labels.dtype}"
        )
    if labels.size and labels.min() < 0:
        raise ExportInputError(f"the {what} label image has negative ids; ids must be >= 0")
    if shape is not None and labels.shape != shape:
        raise ExportInputError(
            f"the {what} label image has shape {labels.shape} but the image is {shape} (Y, X); "
            "they must come from the same field"
        )
    return labels


def column_names(channel_names: Sequence[str]) -> list[str]:
    """Safe, unique column stems for channel names: letters, digits and underscores only.

    >>> column_names(["GFP", "Alexa 647", "p-ERK", "GFP", ""])
    ['GFP', 'Alexa_647', 'p_ERK', 'GFP_2', 'channel_4']
    """
    stems: list[str] = []
    for index, name in enumerate(channel_names):
        stem = _NOT_IN_NAME.sub("_", str(name)).strip("_") or f"channel_{index}"
        candidate, suffix = stem, 2
        while candidate in stems:  # two names that sanitise alike must not share a column
            candidate, suffix = f"{stem}_{suffix}", suffix + 1
        stems.append(candidate)
    return stems


def measurement_columns(channel_names: Sequence[str]) -> list[str]:
    """The CSV header that :func:`measure_cells` rows follow for these channels."""
    stems = column_names(channel_names)
    return [
        *GEOMETRY_COLUMNS,
        *(f"mean_{stem}" for stem in stems),
        *(f"integrated_{stem}" for stem in stems),
        *PAIRING_COLUMNS,
    ]


# ----------------------------------------------------------------------------------------------
# measurements


def _largest_overlap(owners: np.ndarray, others: np.ndarray) -> dict[int, int]:
    """For each id in ``owners``, the id in ``others`` covering most of its pixels (ties: smallest id)."""
    both = (owners > 0) & (others > 0)
    if not both.any():
        return {}
    pairs = np.stack([owners[both], others[both]], axis=1).astype(np.int64)
    unique_pairs, counts = np.unique(pairs, axis=0, return_counts=True)
    # Sort by owner, then count descending, then other ascending: the first row per owner wins.
    order = np.lexsort((unique_pairs[:, 1], -counts, unique_pairs[:, 0]))
    best: dict[int, int] = {}
    for owner, other in unique_pairs[order]:
        best.setdefault(int(owner), int(other))
    return best


def _object_rows(
    kind: str,
    labels: np.ndarray,
    intensity_yxc: np.ndarray,
    stems: Sequence[str],
    partner: dict[int, int],
) -> list[dict[str, object]]:
    if not labels.any():
        return []
    table = regionprops_table(
        labels,
        intensity_image=intensity_yxc,
        properties=("label", "area", "centroid", "bbox", "intensity_mean"),
    )
    ids = table["label"]
    # Exact float64 sums (mean * area would carry the mean's rounding, in float32 for float32 input).
    sums = [
        np.asarray(ndimage.sum_labels(intensity_yxc[..., c].astype(np.float64), labels, index=ids))
        for c in range(len(stems))
    ]
    rows: list[dict[str, object]] = []
    for i, label in enumerate(ids):
        label = int(label)
        row: dict[str, object] = {
            "object": kind,
            "label": label,
            "area": int(table["area"][i]),
            "centroid_y": float(table["centroid-0"][i]),
            "centroid_x": float(table["centroid-1"][i]),
            "bbox_min_y": int(table["bbox-0"][i]),
            "bbox_min_x": int(table["bbox-1"][i]),
            "bbox_max_y": int(table["bbox-2"][i]),
            "bbox_max_x": int(table["bbox-3"][i]),
        }
        for c, stem in enumerate(stems):
            row[f"mean_{stem}"] = float(table[f"intensity_mean-{c}"][i])
        for c, stem in enumerate(stems):
            row[f"integrated_{stem}"] = float(sums[c][i])
        if kind == "nucleus":
            row["nucleus_label"], row["cell_label"] = label, partner.get(label, 0)
        else:
            row["nucleus_label"], row["cell_label"] = partner.get(label, 0), label
        rows.append(row)
    return rows


def measure_cells(
    nuclei: np.ndarray,
    cells: np.ndarray | None,
    image: np.ndarray,
    channel_names: Sequence[str],
) -> list[dict[str, object]]:
    """One row per nucleus, then one per cell: geometry, per-channel mean and integrated intensity.

    Columns are :func:`measurement_columns` ``(channel_names)``: ``mean_<name>`` and
    ``integrated_<name>`` (the sum over the object's pixels) use :func:`column_names`. Without
    ``cells`` only nuclei are measured and their ``cell_label`` is 0.
    """
    image = _check_image(image)
    shape = (int(image.shape[1]), int(image.shape[2]))
    nuclei = _check_labels(nuclei, shape, "nucleus")
    cells = _check_labels(cells, shape, "cell")
    if nuclei is None:
        raise ExportInputError("a nucleus label image is required (it may be all zeros)")
    if len(channel_names) != image.shape[0]:
        raise ExportInputError(
            f"got {len(channel_names)} channel names for an image with {image.shape[0]} channels; "
            "give one name per channel, in order"
        )
    stems = column_names(channel_names)
    intensity_yxc = np.moveaxis(image, 0, -1)  # regionprops wants channels last
    if cells is None:
        return _object_rows("nucleus", nuclei, intensity_yxc, stems, {})
    return [
        *_object_rows("nucleus", nuclei, intensity_yxc, stems, _largest_overlap(nuclei, cells)),
        *_object_rows("cell", cells, intensity_yxc, stems, _largest_overlap(cells, nuclei)),
    ]


def measurements_csv(rows: Sequence[Mapping[str, object]], *, columns: Sequence[str] | None = None) -> bytes:
    """UTF-8 CSV with a header line. Columns: ``columns`` if given, else those of the first row.

    With no rows and no ``columns`` the header is the geometry and pairing columns only; pass
    ``columns=measurement_columns(channel_names)`` to keep the channel columns in an empty table.
    Missing values are written as empty fields.
    """
    if columns is None:
        columns = list(rows[0].keys()) if rows else [*GEOMETRY_COLUMNS, *PAIRING_COLUMNS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


# ----------------------------------------------------------------------------------------------
# PNG previews


def _normalise(channel: np.ndarray) -> np.ndarray:
    """Percentile (1-99) stretch to [0, 1]; a flat channel becomes 0."""
    channel = np.nan_to_num(channel.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = np.percentile(channel, [1.0, 99.0])
    if high <= low:  # sparse or flat channels: fall back to the full range
        low, high = float(channel.min()), float(channel.max())
    if high <= low:
        return np.zeros_like(channel)
    return np.clip((channel - low) / (high - low), 0.0, 1.0)


def _display_shape(shape: tuple[int, int], max_size: int) -> tuple[int, int]:
    if max_size < 1:
        raise ExportInputError(f"max_size must be a positive number of pixels; got {max_size}")
    height, width = shape
    scale = min(1.0, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize_float(plane: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Area-average resize of a float plane (no change when the size is the same)."""
    if plane.shape == out_shape:
        return plane
    resized = Image.fromarray(plane.astype(np.float32), mode="F").resize(
        (out_shape[1], out_shape[0]), Image.Resampling.BOX
    )
    return np.asarray(resized, dtype=np.float32)


def _resize_labels(labels: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize: outlines are then drawn at display size, so they stay 1 pixel wide."""
    if labels.shape == out_shape:
        return labels
    rows = ((np.arange(out_shape[0]) + 0.5) * labels.shape[0] / out_shape[0]).astype(np.intp)
    cols = ((np.arange(out_shape[1]) + 0.5) * labels.shape[1] / out_shape[1]).astype(np.intp)
    return labels[np.ix_(rows, cols)]


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def overlay_png(
    image: np.ndarray,
    nuclei: np.ndarray | None,
    cells: np.ndarray | None,
    *,
    channel: int = 0,
    max_size: int = 1024,
) -> bytes:
    """One channel in grey with nucleus outlines (yellow) and cell outlines (magenta), as PNG.

    The channel is stretched between its 1st and 99th percentiles. Outlines are the objects' inner
    boundary pixels (``find_boundaries(mode="inner")``); nucleus outlines are drawn over cell
    outlines. Images larger than ``max_size`` on their longer side are shrunk to it (area-averaged
    grey, outlines drawn after shrinking).
    """
    image = _check_image(image)
    shape = (int(image.shape[1]), int(image.shape[2]))
    nuclei = _check_labels(nuclei, shape, "nucleus")
    cells = _check_labels(cells, shape, "cell")
    if not -image.shape[0] <= channel < image.shape[0]:
        raise ExportInputError(f"channel {channel} does not exist: the image has {image.shape[0]} channels (0-based)")
    out_shape = _display_shape(shape, max_size)
    grey = _resize_float(_normalise(image[channel]), out_shape)
    rgb = np.repeat(np.round(grey * 255.0).astype(np.uint8)[..., None], 3, axis=-1)
    for labels, colour in ((cells, CELL_OUTLINE_RGB), (nuclei, NUCLEUS_OUTLINE_RGB)):
        if labels is not None:
            rgb[find_boundaries(_resize_labels(labels, out_shape), mode="inner")] = colour
    return _png(rgb)


def composite_png(image: np.ndarray, *, channels: Sequence[int] | None = None, max_size: int = 1024) -> bytes:
    """Up to four channels blended additively in red, green, blue and grey, as PNG.

    Each channel is stretched between its 1st and 99th percentiles first. ``channels`` picks which
    (default: the first four).
    """
    image = _check_image(image)
    chosen = list(range(min(4, image.shape[0]))) if channels is None else list(channels)
    if not 1 <= len(chosen) <= len(COMPOSITE_RGB):
        raise ExportInputError(f"a composite shows 1 to 4 channels; got {len(chosen)}")
    for index in chosen:
        if not 0 <= index < image.shape[0]:
            raise ExportInputError(f"channel {index} does not exist: the image has {image.shape[0]} channels (0-based)")
    out_shape = _display_shape((int(image.shape[1]), int(image.shape[2])), max_size)
    blend = np.zeros((*out_shape, 3), dtype=np.float32)
    for index, colour in zip(chosen, COMPOSITE_RGB, strict=False):
        blend += _resize_float(_normalise(image[index]), out_shape)[..., None] * np.asarray(colour, np.float32)
    return _png(np.round(np.clip(blend, 0.0, 1.0) * 255.0).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# ImageJ / Fiji ROI sets


def _pixel_edge_polygon(mask: np.ndarray) -> np.ndarray:
    """Outer outline of a binary mask along pixel edges, as (x, y) integer corners of the mask.

    ``find_contours`` at level 0.5 walks through midpoints of pixel edges; every diagonal step of
    that walk turns around one pixel corner, and those corners, in order, are the rectilinear
    outline (ImageJ's coordinates put pixel (row r, column c) at [c, c+1) x [r, r+1)).

    >>> _pixel_edge_polygon(np.ones((1, 2), bool)).tolist()  # one 1x2 object: a 2x1 rectangle
    [[0, 1], [0, 0], [2, 0], [2, 1]]
    """
    padded = np.pad(mask, 1)
    contours = find_contours(padded.astype(np.float32), 0.5)

    # The largest |area| is the outer outline of the largest piece (holes and crumbs are smaller).
    def enclosed(contour: np.ndarray) -> float:
        y, x = contour[:, 0], contour[:, 1]
        return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2.0

    walk = max(contours, key=enclosed)[:-1]  # closed: the last point repeats the first
    # Pixel-centre (padded) coordinates -> ImageJ corner-origin coordinates of the unpadded mask.
    xy = np.stack([walk[:, 1], walk[:, 0]], axis=1) - 0.5
    following = np.roll(xy, -1, axis=0)
    diagonal = np.all(np.abs(following - xy) == 0.5, axis=1)
    here_is_whole = np.isclose(xy, np.round(xy))
    corners = np.where(here_is_whole, xy, following)[diagonal]
    return np.round(corners).astype(np.int32)


def imagej_rois_zip(labels: np.ndarray, *, prefix: str) -> bytes:
    """An ImageJ/Fiji ROI set (a zip of ``.roi`` files): one polygon per label, its outer outline.

    ROIs are named ``f"{prefix}-{label:05d}"`` (file ``<name>.roi``), in increasing label order, so
    Fiji's ROI Manager lists them as in the measurement table. An object in several pieces gets the
    outline of its largest piece; holes are not stored. No labels gives an empty (valid) zip.
    """
    labels = _check_labels(labels, None, "ROI")
    assert labels is not None
    if not prefix or _NOT_IN_NAME.sub("", prefix.replace("-", "")) != prefix.replace("-", ""):
        raise ExportInputError(
            f"the ROI name prefix must be letters, digits, '_' or '-' (it becomes file names); got {prefix!r}"
        )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for region in regionprops(labels):  # sorted by label; crops keep this fast for many objects
            top, left = region.bbox[0], region.bbox[1]
            polygon = _pixel_edge_polygon(region.image) + np.array([left, top], dtype=np.int32)
            name = f"{prefix}-{region.label:05d}"
            roi = ImagejRoi.frompoints(polygon, name=name)
            roi.roitype = ROI_TYPE.POLYGON  # frompoints makes FREEHAND; an outline is a polygon
            archive.writestr(f"{name}.roi", roi.tobytes())
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Viewer layers: full-resolution images that a deep-zoom viewer stacks (channels add up, outlines
# are transparent elsewhere), so that the page can toggle, tint and fade each one on its own.


def display_range(plane: np.ndarray) -> tuple[float, float]:
    """The (low, high) intensity that a viewer opens a channel with: its 1st and 99.8th percentiles
    (Fiji's "auto" contrast saturates a similar 0.35 %), falling back to the full range when flat."""
    plane = np.nan_to_num(np.asarray(plane, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(v) for v in np.percentile(plane, [1.0, 99.8]))
    if high <= low:
        low, high = float(plane.min()), float(plane.max())
    return low, high


def channel_layer_png(plane: np.ndarray, low: float, high: float, rgb: Sequence[float]) -> bytes:
    """One channel at full resolution, linearly scaled from [low, high] to [0, 1] and tinted with
    ``rgb`` (each 0..1), as an RGB PNG on black: layers drawn with additive blending then make
    Fiji's composite view."""
    plane = np.asarray(plane)
    if plane.ndim != 2 or plane.size == 0:
        raise ExportInputError(f"a channel must be a non-empty 2-D array; got shape {plane.shape}")
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ExportInputError("the display range must be two finite numbers")
    if len(rgb) != 3 or not all(0.0 <= float(c) <= 1.0 for c in rgb):
        raise ExportInputError(f"a tint is three numbers in [0, 1]; got {list(rgb)}")
    span = float(high) - float(low)
    values = np.nan_to_num(plane.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    scaled = np.zeros_like(values) if span <= 0 else np.clip((values - float(low)) / span, 0.0, 1.0)
    out = np.round(scaled[..., None] * np.asarray(rgb, dtype=np.float32) * 255.0).astype(np.uint8)
    return _png(out)


def outline_layer_png(labels: np.ndarray, rgb: Sequence[int]) -> bytes:
    """Each object's inner boundary in ``rgb`` (0..255) and everything else transparent, as an RGBA
    PNG of the label image's own size (the same outlines as :func:`overlay_png`, never shrunk)."""
    labels = _check_labels(labels, None, "label")
    if len(rgb) != 3 or not all(0 <= int(c) <= 255 for c in rgb):
        raise ExportInputError(f"an outline colour is three integers in [0, 255]; got {list(rgb)}")
    out = np.zeros(labels.shape + (4,), dtype=np.uint8)
    out[find_boundaries(labels, mode="inner")] = (*(int(c) for c in rgb), 255)
    buffer = io.BytesIO()
    Image.fromarray(out, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()
