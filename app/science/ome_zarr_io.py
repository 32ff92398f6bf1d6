"""OME-Zarr (OME-NGFF) HCS plates in and out: read a plate's layout, fields and channel names;
write instance masks as NGFF ``labels`` next to each field's image and a measurements table per well.

Reading goes through ``zarr`` (metadata only until a field's pixels are asked for, so a plate is
validated without loading it); writing labels goes through ``ome-zarr``'s writer, in the NGFF
version of the plate (0.4 with zarr v2, 0.5 with zarr v3), so Fractal, OMERO and napari read them.

Layout written (per field image ``<row>/<col>/<field>``)::

    <row>/<col>/<field>/labels/.zattrs|zarr.json   {"labels": ["nuclei", "cells"]}
    <row>/<col>/<field>/labels/nuclei               multiscale label image, "image-label" metadata
    <row>/<col>/tables/measurements.csv             one row per object of every field of the well

The table is a plain CSV file inside the well's folder (no AnnData): the NGFF tables proposal is
AnnData-based and not part of the spec; a CSV is what LIMS and spreadsheets read. Label pixels hold
the same object ids as the table's ``label`` column.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAX_CHANNEL_NAME = 120
_SAFE_PART = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class OmeZarrError(ValueError):
    """A plate, well or field that cannot be used, with where and what (for a 422 or a field failure)."""

    def __init__(self, message: str, *, well: str | None = None, field: str | None = None):
        where = " ".join(part for part in (f"well {well}" if well else "", f"field {field}" if field else "") if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.well = well
        self.field = field


@dataclass(frozen=True)
class ZarrField:
    well: str  # "A01"-style name, for results and reports
    well_path: str  # "A/1"
    path: str  # "A/1/0": the image group, relative to the plate root
    index: int  # the field's position in the well
    shape: tuple[int, int, int]  # (C, Y, X)
    axes: tuple[str, ...]  # the image's axes, e.g. ("c", "y", "x") or ("t", "c", "z", "y", "x")
    scales: tuple[tuple[float, ...], ...]  # per resolution level, in axes order


@dataclass(frozen=True)
class ZarrPlate:
    root: Path
    name: str | None
    version: str
    zarr_format: int
    rows: list[str]
    columns: list[str]
    channel_names: list[str]
    fields: list[ZarrField] = field(default_factory=list)

    @property
    def wells(self) -> list[str]:
        return list(dict.fromkeys(f.well for f in self.fields))


def _ome(attrs: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """NGFF 0.5 keeps metadata under "ome"; 0.4 and earlier at the top level."""
    if isinstance(attrs.get("ome"), dict):
        ome = attrs["ome"]
        return ome, str(ome.get("version", "0.5"))
    return attrs, None


def _open_group(path: Path, mode: str = "r"):
    import zarr

    return zarr.open_group(str(path), mode=mode)  # type: ignore[arg-type]


def _safe(part: Any, what: str, *, well: str | None = None) -> str:
    text = str(part)
    if not _SAFE_PART.fullmatch(text) or text in (".", ".."):
        raise OmeZarrError(f"{what} {text!r} is not a plain name (letters, digits, '.', '_', '-')", well=well)
    return text


def well_name(row: str, column: str) -> str:
    """'A' + '1' -> 'A01' (the name CellFuse's results use for wells)."""
    return f"{row}{int(column):02d}" if column.isdigit() else f"{row}{column}"


def _field_meta(plate_root: Path, path: str, well: str, index: int) -> tuple[ZarrField, list[str]]:
    label = str(index)
    try:
        group = _open_group(plate_root / path)
    except Exception as exc:
        raise OmeZarrError(
            f"the image group {path!r} cannot be opened ({type(exc).__name__})", well=well, field=label
        ) from exc
    attrs, _version = _ome(dict(group.attrs))
    multiscales = attrs.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise OmeZarrError("the image has no 'multiscales' metadata", well=well, field=label)
    ms = multiscales[0]
    axes = tuple(str(a.get("name") if isinstance(a, dict) else a).lower() for a in ms.get("axes", []))
    if not axes or axes[-2:] != ("y", "x") or len(set(axes)) != len(axes) or not set(axes) <= set("tczyx"):
        raise OmeZarrError(
            f"the image axes {list(axes)} are not (t, c, z, y, x) ending in y, x", well=well, field=label
        )
    datasets = ms.get("datasets") or []
    if not datasets or not isinstance(datasets[0], dict) or "path" not in datasets[0]:
        raise OmeZarrError("the image's multiscales lists no datasets", well=well, field=label)
    try:
        array = group[str(datasets[0]["path"])]
    except Exception as exc:
        raise OmeZarrError(
            f"the full-resolution array {datasets[0]['path']!r} is missing", well=well, field=label
        ) from exc
    shape = dict(zip(axes, array.shape, strict=False))
    if len(array.shape) != len(axes):
        raise OmeZarrError(
            f"the array has {len(array.shape)} dimensions but the axes name {len(axes)}", well=well, field=label
        )
    for axis in ("t", "z"):
        if shape.get(axis, 1) != 1:
            raise OmeZarrError(
                f"the image has {axis}={shape[axis]}; CellFuse segments 2D fields (one time "
                "point, one plane): project or split the stack first",
                well=well,
                field=label,
            )
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise OmeZarrError(f"pixel type {array.dtype} is not a real number type", well=well, field=label)
    scales = []
    for ds in datasets:
        scale = [1.0] * len(axes)
        for transform in ds.get("coordinateTransformations") or []:
            if isinstance(transform, dict) and transform.get("type") == "scale":
                scale = [float(v) for v in transform.get("scale", scale)]
        scales.append(tuple(scale))
    omero = attrs.get("omero") if isinstance(attrs.get("omero"), dict) else {}
    names = [
        str(ch.get("label") or f"channel-{i}")[:MAX_CHANNEL_NAME]
        for i, ch in enumerate(omero.get("channels") or [])  # type: ignore[union-attr]
        if isinstance(ch, dict)
    ]
    n_channels = shape.get("c", 1)
    if names and len(names) != n_channels:
        raise OmeZarrError(
            f"omero lists {len(names)} channel(s) but the image has c={n_channels}", well=well, field=label
        )
    zf = ZarrField(
        well=well,
        well_path=str(Path(path).parent),
        path=path,
        index=index,
        shape=(n_channels, shape["y"], shape["x"]),
        axes=axes,
        scales=tuple(scales),
    )
    return zf, names


def read_plate(path: str | Path, *, wells: Sequence[str] | None = None, max_pixels: int | None = None) -> ZarrPlate:
    """The plate's layout and every selected field's metadata, checked; pixels are not read.

    ``wells``: only these wells (names like "A01" or paths like "A/1"). ``max_pixels``: refuse fields
    with more than this many C*Y*X pixels. Every problem names its well and field.
    """
    root = Path(path)
    try:
        group = _open_group(root)
    except Exception as exc:
        raise OmeZarrError(f"{root.name} is not a readable OME-Zarr group ({type(exc).__name__}: {exc})") from exc
    attrs, version = _ome(dict(group.attrs))
    plate = attrs.get("plate")
    if not isinstance(plate, dict):
        raise OmeZarrError(
            f"{root.name} has no HCS 'plate' metadata: give the plate's root folder, not a well or an image"
        )
    version = version or str(plate.get("version", "0.4"))
    rows = [_safe(r.get("name"), "row name") for r in plate.get("rows", []) if isinstance(r, dict)]
    columns = [_safe(c.get("name"), "column name") for c in plate.get("columns", []) if isinstance(c, dict)]
    wanted = None if wells is None else {w.strip() for w in wells}
    fields: list[ZarrField] = []
    channel_names: list[str] | None = None
    first_where = None
    for entry in plate.get("wells", []):
        if not isinstance(entry, dict) or "path" not in entry:
            raise OmeZarrError("a 'wells' entry of the plate has no path")
        parts = str(entry["path"]).split("/")
        if len(parts) != 2:
            raise OmeZarrError(f"well path {entry['path']!r} is not '<row>/<column>'")
        row, column = (_safe(p, "well path part") for p in parts)
        well = well_name(row, column)
        if wanted is not None and well not in wanted and f"{row}/{column}" not in wanted:
            continue
        try:
            well_group = _open_group(root / row / column)
        except Exception as exc:
            raise OmeZarrError("the well group listed by the plate is missing", well=well) from exc
        well_attrs, _ = _ome(dict(well_group.attrs))
        images = (well_attrs.get("well") or {}).get("images") if isinstance(well_attrs.get("well"), dict) else None
        if not images:
            raise OmeZarrError("the well has no 'well.images' metadata (no fields)", well=well)
        for index, image in enumerate(images):
            if not isinstance(image, dict) or "path" not in image:
                raise OmeZarrError(f"image entry {index} has no path", well=well)
            image_path = _safe(image["path"], "field path", well=well)
            zf, names = _field_meta(root, f"{row}/{column}/{image_path}", well, index)
            if max_pixels is not None and math.prod(zf.shape) > max_pixels:
                raise OmeZarrError(
                    f"the field has {math.prod(zf.shape):,} pixels (C*Y*X), more than the limit of {max_pixels:,}",
                    well=well,
                    field=str(index),
                )
            names = names or [f"channel-{i}" for i in range(zf.shape[0])]
            if channel_names is None:
                channel_names, first_where = names, f"well {well} field {index}"
            elif names != channel_names:
                raise OmeZarrError(
                    f"its channels {names} differ from {channel_names} of {first_where}; every field "
                    "of a plate must have the same channels in the same order",
                    well=well,
                    field=str(index),
                )
            fields.append(zf)
    if wanted is not None:
        found = {f.well for f in fields} | {f.well_path for f in fields}
        missing = sorted(w for w in wanted if w not in found)
        if missing:
            raise OmeZarrError(f"the plate has no well(s) {', '.join(missing)}")
    if not fields:
        raise OmeZarrError("the plate lists no wells with fields")
    default_format = 3 if version.startswith("0.5") else 2
    zarr_format = int(getattr(getattr(group, "metadata", None), "zarr_format", default_format))
    return ZarrPlate(
        root=root,
        name=plate.get("name"),
        version=version,
        zarr_format=zarr_format,
        rows=rows,
        columns=columns,
        channel_names=channel_names or [],
        fields=fields,
    )


class FieldArray:
    """A (C, Y, X) view of a field's full-resolution array that reads only the slices asked for
    (so a stitched well can be segmented block by block)."""

    def __init__(self, array, axes: Sequence[str]):
        self.array = array
        self.axes = tuple(axes)
        sizes = dict(zip(self.axes, array.shape, strict=True))
        self.shape = (sizes.get("c", 1), sizes["y"], sizes["x"])
        self.ndim = 3
        self.dtype = array.dtype

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        by_axis = {"c": key[0], "y": key[1], "x": key[2]}
        index = tuple(by_axis.get(a, 0) if a in "cyx" else 0 for a in self.axes)
        if "c" not in self.axes:
            out = np.asarray(self.array[index])
            return out[np.newaxis][key[0]] if not isinstance(key[0], int) else out
        return np.asarray(self.array[index])

    def __array__(self, dtype=None, copy=None):
        out = self[:, :, :]
        return out.astype(dtype) if dtype is not None else out


def open_field(plate_root: str | Path, zf: ZarrField) -> FieldArray:
    group = _open_group(Path(plate_root) / zf.path)
    attrs, _ = _ome(dict(group.attrs))
    return FieldArray(group[str(attrs["multiscales"][0]["datasets"][0]["path"])], zf.axes)


def _format_for(version: str):
    from ome_zarr.format import FormatV04, FormatV05  # type: ignore[import-untyped]

    return FormatV05() if version.startswith("0.5") else FormatV04()


def write_labels(
    plate: ZarrPlate,
    zf: ZarrField,
    name: str,
    labels: np.ndarray,
    source: dict[str, Any],
    *,
    properties: list[dict[str, Any]] | None = None,
) -> str:
    """Write ``labels`` (Y, X) as NGFF label image ``name`` of the field; returns its path in the plate.

    The label image has the field's axes without ``c`` and the same resolution levels and scales as
    the image (nearest-neighbour downsampling), so viewers overlay it pixel for pixel. ``source`` is
    recorded in ``image-label.source`` beside the required ``image`` link (NGFF allows extra keys).
    """
    from ome_zarr.writer import write_labels as ngff_write_labels  # type: ignore[import-untyped]

    name = _safe(name, "label name")
    labels = np.asarray(labels)
    if labels.shape != zf.shape[1:]:
        raise OmeZarrError(
            f"labels of shape {labels.shape} do not fit the image's {zf.shape[1:]}", well=zf.well, field=str(zf.index)
        )
    label_axes = [a for a in zf.axes if a != "c"]
    data = labels.reshape([1] * (len(label_axes) - 2) + list(labels.shape))
    dtype = np.uint32 if labels.max(initial=0) > np.iinfo(np.uint16).max else np.uint16
    keep = [i for i, a in enumerate(zf.axes) if a != "c"]
    transforms = [[{"type": "scale", "scale": [s[i] for i in keep]}] for s in zf.scales]
    factors = _scale_factors(zf)
    group = _open_group(plate.root / zf.path, mode="r+")
    ngff_write_labels(
        data.astype(dtype),
        group,
        name=name,
        scale_factors=factors,
        fmt=_format_for(plate.version),
        axes=label_axes,
        coordinate_transformations=transforms[: len(factors) + 1],
        label_metadata={"source": {"image": "../../", **source}, **({"properties": properties} if properties else {})},  # type: ignore[dict-item]
    )
    return f"{zf.path}/labels/{name}"


def _scale_factors(zf: ZarrField) -> list[int]:
    """Downsampling factors of the image's levels relative to level 0 (powers of two are assumed by
    ome-zarr's writer; levels that are not are left out)."""
    factors = []
    y = zf.axes.index("y")
    for scale in zf.scales[1:]:
        ratio = scale[y] / zf.scales[0][y] if zf.scales[0][y] else 0
        if ratio >= 2 and float(ratio).is_integer() and (int(ratio) & (int(ratio) - 1)) == 0:
            factors.append(int(ratio))
        else:
            break
    return factors


def write_well_table(plate: ZarrPlate, well_path: str, name: str, csv_bytes: bytes) -> str:
    """A CSV inside the well's folder: ``<row>/<col>/tables/<name>.csv`` (see the module notes)."""
    name = _safe(name, "table name")
    folder = plate.root / well_path / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.csv"
    tmp = target.with_name(f".{target.name}.partial")
    tmp.write_bytes(csv_bytes)
    tmp.replace(target)
    return f"{well_path}/tables/{name}.csv"


def read_labels(plate_root: str | Path, field_path: str, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A label image (full resolution, as (Y, X)) and its ``image-label`` metadata, read with ome-zarr."""
    from ome_zarr.io import parse_url  # type: ignore[import-untyped]
    from ome_zarr.reader import Label, Reader  # type: ignore[import-untyped]

    location = parse_url(str(Path(plate_root) / field_path / "labels" / name))
    if location is None:
        raise OmeZarrError(f"no label image {name!r} at {field_path}")
    # The reader also yields the parent image; the label image is the node with a Label spec.
    node = next((n for n in Reader(location)() if any(isinstance(spec, Label) for spec in n.specs)), None)
    if node is None:
        raise OmeZarrError(f"{field_path}/labels/{name} is not an NGFF label image")
    data = np.asarray(node.data[0])
    attrs, _ = _ome(dict(_open_group(Path(plate_root) / field_path / "labels" / name).attrs))
    return data.reshape(data.shape[-2:]), attrs.get("image-label", {})
