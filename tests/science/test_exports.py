"""Exports: measurements against hand-computed values, PNG outlines on boundaries, ImageJ ROI sets."""

from __future__ import annotations

import csv
import io
import zipfile

import numpy as np
import pytest
from PIL import Image
from roifile import ROI_TYPE, ImagejRoi
from skimage.segmentation import find_boundaries

from app.science.exports import (
    CELL_OUTLINE_RGB,
    NUCLEUS_OUTLINE_RGB,
    ExportInputError,
    column_names,
    composite_png,
    imagej_rois_zip,
    measure_cells,
    measurement_columns,
    measurements_csv,
    overlay_png,
)

CHANNELS = ("GFP", "Alexa 647")


@pytest.fixture()
def field() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nucleus 1 (4x4) inside cell 7 (8x9); nucleus 2 (3x5) in no cell; cell 9 (7x6) without nucleus.

    Channel 0 is 2.0 on nucleus 1 and 1.0 elsewhere; channel 1 is the column index.
    """
    nuclei = np.zeros((20, 24), np.int32)
    nuclei[4:8, 4:8] = 1
    nuclei[12:15, 15:20] = 2
    cells = np.zeros((20, 24), np.uint16)
    cells[2:10, 2:11] = 7
    cells[11:18, 2:8] = 9
    image = np.ones((2, 20, 24), np.float32)
    image[0][nuclei == 1] = 2.0
    image[1] = np.arange(24, dtype=np.float32)[None, :]
    return nuclei, cells, image


def _by_key(rows: list[dict[str, object]]) -> dict[tuple[object, object], dict[str, object]]:
    return {(row["object"], row["label"]): row for row in rows}


def test_measurements_match_hand_computed_values(field) -> None:
    nuclei, cells, image = field
    rows = measure_cells(nuclei, cells, image, CHANNELS)
    assert [(r["object"], r["label"]) for r in rows] == [("nucleus", 1), ("nucleus", 2), ("cell", 7), ("cell", 9)]
    assert all(list(r) == measurement_columns(CHANNELS) for r in rows)
    table = _by_key(rows)

    n1 = table["nucleus", 1]
    assert (n1["area"], n1["centroid_y"], n1["centroid_x"]) == (16, 5.5, 5.5)
    assert (n1["bbox_min_y"], n1["bbox_min_x"], n1["bbox_max_y"], n1["bbox_max_x"]) == (4, 4, 8, 8)
    assert n1["mean_GFP"] == pytest.approx(2.0) and n1["integrated_GFP"] == pytest.approx(32.0)
    assert n1["mean_Alexa_647"] == pytest.approx(5.5) and n1["integrated_Alexa_647"] == pytest.approx(88.0)

    n2 = table["nucleus", 2]
    assert (n2["area"], n2["centroid_y"], n2["centroid_x"]) == (15, 13.0, 17.0)
    assert (n2["bbox_min_y"], n2["bbox_min_x"], n2["bbox_max_y"], n2["bbox_max_x"]) == (12, 15, 15, 20)
    assert n2["integrated_Alexa_647"] == pytest.approx(15 * 17.0)

    c7 = table["cell", 7]
    assert (c7["area"], c7["centroid_y"], c7["centroid_x"]) == (72, 5.5, 6.0)
    assert c7["integrated_GFP"] == pytest.approx(16 * 2.0 + 56 * 1.0)
    assert c7["mean_GFP"] == pytest.approx(88.0 / 72.0)
    assert c7["integrated_Alexa_647"] == pytest.approx(8 * sum(range(2, 11)))

    # Pairing: each row names its nucleus and its cell (0 = none).
    assert (n1["nucleus_label"], n1["cell_label"]) == (1, 7)
    assert (n2["nucleus_label"], n2["cell_label"]) == (2, 0)
    assert (c7["nucleus_label"], c7["cell_label"]) == (1, 7)
    assert (table["cell", 9]["nucleus_label"], table["cell", 9]["cell_label"]) == (0, 9)


def test_cell_takes_the_nucleus_with_the_largest_overlap() -> None:
    cells = np.zeros((6, 10), np.int32)
    cells[:, :5], cells[:, 5:] = 1, 2
    nuclei = np.zeros((6, 10), np.int32)
    nuclei[1:3, 1:7] = 4  # 8 pixels in cell 1, 4 in cell 2
    nuclei[4, 6:9] = 3  # 3 pixels in cell 2, fewer than nucleus 4's 4 there
    rows = _by_key(measure_cells(nuclei, cells, np.zeros((1, 6, 10)), ["c"]))
    assert rows["cell", 1]["nucleus_label"] == 4
    assert rows["cell", 2]["nucleus_label"] == 4
    assert rows["nucleus", 4]["cell_label"] == 1
    assert rows["nucleus", 3]["cell_label"] == 2


def test_nuclei_only_and_csv_round_trip(field) -> None:
    nuclei, _, image = field
    rows = measure_cells(nuclei, None, image, CHANNELS)
    assert [r["object"] for r in rows] == ["nucleus", "nucleus"]
    assert all(r["cell_label"] == 0 for r in rows)
    parsed = list(csv.DictReader(io.StringIO(measurements_csv(rows).decode("utf-8"))))
    assert list(parsed[0]) == measurement_columns(CHANNELS)
    assert parsed[0]["object"] == "nucleus" and int(parsed[0]["area"]) == 16
    assert float(parsed[0]["integrated_Alexa_647"]) == pytest.approx(88.0)


def test_empty_labels_give_a_header_only_csv(field) -> None:
    _, _, image = field
    empty = np.zeros((20, 24), np.int32)
    rows = measure_cells(empty, empty, image, CHANNELS)
    assert rows == []
    text = measurements_csv(rows, columns=measurement_columns(CHANNELS)).decode("utf-8")
    assert text.splitlines() == [",".join(measurement_columns(CHANNELS))]
    bare = measurements_csv([]).decode("utf-8").splitlines()
    assert len(bare) == 1 and bare[0].startswith("object,label,area,")


def test_channel_names_are_sanitised_and_unique() -> None:
    assert column_names(["GFP", "Alexa 647", "p-ERK/β", "GFP", "  "]) == [
        "GFP",
        "Alexa_647",
        "p_ERK",
        "GFP_2",
        "channel_4",
    ]


@pytest.mark.parametrize(
    ("nuclei", "cells", "names", "message"),
    [
        (np.zeros((20, 24), np.int32), None, ["only one"], "channel names"),
        (np.zeros((20, 23), np.int32), None, CHANNELS, "same field"),
        (np.zeros((20, 24), np.float32), None, CHANNELS, "integer ids"),
        (np.zeros((20, 24), np.int32), -np.ones((20, 24), np.int32), CHANNELS, "negative"),
    ],
)
def test_bad_input_is_refused_clearly(field, nuclei, cells, names, message) -> None:
    _, _, image = field
    with pytest.raises(ExportInputError, match=message):
        measure_cells(nuclei, cells, image, names)


def _decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as decoded:
        assert decoded.format == "PNG"
        return np.asarray(decoded.convert("RGB"))


def test_overlay_outlines_lie_exactly_on_boundaries(field) -> None:
    nuclei, cells, image = field
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1000, size=image.shape).astype(np.float32)
    rgb = _decode(overlay_png(image, nuclei, cells, channel=1))
    assert rgb.shape == (20, 24, 3)
    nucleus_edge = find_boundaries(nuclei, mode="inner")
    cell_edge = find_boundaries(cells, mode="inner") & ~nucleus_edge
    assert np.array_equal(np.all(rgb == NUCLEUS_OUTLINE_RGB, axis=-1), nucleus_edge)
    assert np.array_equal(np.all(rgb == CELL_OUTLINE_RGB, axis=-1), cell_edge)
    rest = rgb[~(nucleus_edge | cell_edge)]
    assert np.all((rest[:, 0] == rest[:, 1]) & (rest[:, 1] == rest[:, 2]))  # grey elsewhere
    assert rest[:, 0].min() == 0 and rest[:, 0].max() == 255  # percentile stretch uses the range


def test_overlay_is_downscaled_to_max_size() -> None:
    labels = np.zeros((300, 200), np.int32)
    labels[100:200, 50:150] = 1
    rgb = _decode(overlay_png(np.ones((1, 300, 200)), labels, None, max_size=100))
    assert rgb.shape == (100, 67, 3)
    outline = np.all(rgb == NUCLEUS_OUTLINE_RGB, axis=-1)
    assert outline.any() and outline.sum() < 4 * 40  # a thin 1-pixel outline of a ~33x33 square
    with pytest.raises(ExportInputError, match="channel 3"):
        overlay_png(np.ones((1, 30, 20)), labels[:30, :20], None, channel=3)


def test_composite_colours_follow_channels() -> None:
    image = np.zeros((2, 10, 12), np.float32)
    image[0, :, :6] = 1.0  # left half in channel 0 -> red
    image[1, :, 6:] = 1.0  # right half in channel 1 -> green
    rgb = _decode(composite_png(image))
    assert rgb.shape == (10, 12, 3)
    assert np.all(rgb[:, :6] == (255, 0, 0)) and np.all(rgb[:, 6:] == (0, 255, 0))


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0].astype(float), points[:, 1].astype(float)
    return abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))) / 2.0


def test_roi_zip_has_one_polygon_per_label_inside_its_box(field) -> None:
    _, cells, _ = field
    labels = cells.astype(np.int32)
    labels[13:16, 14:19] = 12
    labels[14, 19] = 12  # a bump, so the outline is not a rectangle
    with zipfile.ZipFile(io.BytesIO(imagej_rois_zip(labels, prefix="cell"))) as archive:
        names = archive.namelist()
        assert names == ["cell-00007.roi", "cell-00009.roi", "cell-00012.roi"]
        for name in names:
            roi = ImagejRoi.frombytes(archive.read(name))
            label = int(name[5:10])
            assert roi.name == name[:-4]
            assert roi.roitype == ROI_TYPE.POLYGON
            ys, xs = np.nonzero(labels == label)
            points = roi.coordinates()
            # Pixel-edge outline: corners from (min x, min y) to (max x + 1, max y + 1).
            assert points[:, 0].min() == xs.min() and points[:, 0].max() == xs.max() + 1
            assert points[:, 1].min() == ys.min() and points[:, 1].max() == ys.max() + 1
            assert _polygon_area(points) == len(ys)  # no holes: the outline encloses every pixel


def test_roi_zip_of_empty_labels_is_an_empty_zip_and_prefix_is_checked() -> None:
    with zipfile.ZipFile(io.BytesIO(imagej_rois_zip(np.zeros((5, 5), np.int32), prefix="n"))) as archive:
        assert archive.namelist() == []
    with pytest.raises(ExportInputError, match="prefix"):
        imagej_rois_zip(np.ones((5, 5), np.int32), prefix="../evil")
