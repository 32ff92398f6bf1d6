"""Looking at a job's results without downloading them: every result as one zip archive, a plate's
per-well summary, and the layers of the result viewer (channels, outlines, the cell under a click).

The viewer layers are computed from the stored field image and the job's label images with numpy
and PIL (app.science.exports); nothing here imports torch.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Response
from fastapi.responses import StreamingResponse

from app.api.deps import InstrumentDep, SessionDep, SettingsDep
from app.api.errors import Problem
from app.api.job_records import get_visible_job
from app.models import Job
from app.science import exports
from app.science.image_files import ImageReadError, read_image, read_labels
from app.storage import BlobNotFound, BlobStore, JobFolder

router = APIRouter(prefix="/api/v1/jobs", tags=["results"])

#: Viewer tints per channel index (Fiji's composite order: red, green, blue, grey, then more).
CHANNEL_TINTS = ("ff0000", "00ff00", "0000ff", "ffffff", "00ffff", "ff00ff", "ffff00", "ff8000")
OUTLINE_COLOURS = {"nuclei": exports.NUCLEUS_OUTLINE_RGB, "cells": exports.CELL_OUTLINE_RGB}

# Decoded images are kept for a few requests: the viewer asks for several layers of one field in a row.
_CACHE: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 6


def _cached(key: tuple[str, str], load) -> np.ndarray:
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    value = load()
    with _CACHE_LOCK:
        _CACHE[key] = value
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return value


# ----------------------------------------------------------------------------------------------
# download all


def _zip_chunks(folder: JobFolder, names: list[str]) -> Iterator[bytes]:
    """A zip archive written into a small buffer that is handed on and emptied file by file, so the
    whole archive never sits in memory. Images and zips are stored; text is deflated."""

    class Sink(io.RawIOBase):
        def __init__(self) -> None:
            self.parts: list[bytes] = []
            self.offset = 0

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            self.parts.append(bytes(data))
            self.offset += len(data)
            return len(data)

        def tell(self) -> int:
            return self.offset

        def take(self) -> bytes:
            out, self.parts = b"".join(self.parts), []
            return out

    sink = Sink()
    with zipfile.ZipFile(sink, "w") as archive:
        for name in names:
            path = folder.file(name)
            if not path.is_file():
                continue
            compress = zipfile.ZIP_STORED if path.suffix in (".tif", ".png", ".zip") else zipfile.ZIP_DEFLATED
            info = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
            info.compress_type = compress
            with path.open("rb") as source, archive.open(info, "w", force_zip64=True) as target:
                while chunk := source.read(1 << 20):
                    target.write(chunk)
                    yield sink.take()
            yield sink.take()
    yield sink.take()


@router.get(
    "/{job_id}/results.zip",
    summary="Every result of a job as one zip archive",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/zip": {}}}},
)
def download_all(job_id: str, session: SessionDep, settings: SettingsDep, principal: InstrumentDep) -> Response:
    job = get_visible_job(session, job_id, principal)
    if not job.results:
        raise Problem(404, f"job {job_id} has no results yet", slug="result-not-found")
    names = sorted(r.name for r in job.results)
    filename = f"cellfuse-{job.kind}-{job.id[:8]}.zip"
    return StreamingResponse(
        _zip_chunks(JobFolder(settings.jobs_dir, job.id), names),
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


# ----------------------------------------------------------------------------------------------
# one field of a segmentation


def _field(job: Job, name: str) -> dict[str, Any]:
    for field in (job.params or {}).get("fields", []):
        if field.get("name") == name:
            return field
    raise Problem(404, f"job {job.id} has no field named {name!r}", slug="field-not-found")


def _channel_names(job: Job, n: int) -> list[str]:
    names = list((job.params or {}).get("channels") or [])
    return [names[i] if i < len(names) else f"channel {i + 1}" for i in range(n)]


def _field_image(job: Job, field: dict[str, Any], settings) -> np.ndarray:
    sha = field.get("image_sha256")
    if not sha:
        raise Problem(404, f"field {field.get('name')!r} has no stored image", slug="field-not-found")

    def load() -> np.ndarray:
        try:
            raw = BlobStore(settings.blob_dir).read_bytes(sha)
        except (BlobNotFound, FileNotFoundError):
            raise Problem(410, "the field's image is no longer stored", slug="result-gone") from None
        try:
            return read_image(raw, max_pixels=settings.max_image_pixels).data
        except ImageReadError as exc:
            raise Problem(410, f"the field's stored image cannot be read: {exc}", slug="result-gone") from None

    return _cached(("image", sha), load)


def _field_labels(job: Job, field_name: str, obj: str, settings) -> np.ndarray | None:
    names = {r.name for r in job.results}
    name = f"{field_name}/{obj}.tif"
    if name not in names:
        return None
    path = JobFolder(settings.jobs_dir, job.id).file(name)
    if not path.is_file():
        return None
    return _cached((job.id, name), lambda: read_labels(path.read_bytes(), max_pixels=settings.max_image_pixels))


def _measurements(job: Job, field_name: str, settings) -> list[dict[str, str]]:
    name = f"{field_name}/measurements.csv"
    if name not in {r.name for r in job.results}:
        return []
    path = JobFolder(settings.jobs_dir, job.id).file(name)
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/{job_id}/view/{field}", summary="What the viewer needs to open one field")
def field_view(
    job_id: str, field: str, session: SessionDep, settings: SettingsDep, principal: InstrumentDep
) -> dict[str, Any]:
    job = get_visible_job(session, job_id, principal)
    meta = _field(job, field)
    image = _field_image(job, meta, settings)
    channels = []
    for index, name in enumerate(_channel_names(job, image.shape[0])):
        low, high = exports.display_range(image[index])
        plane = image[index]
        channels.append(
            {
                "index": index,
                "name": name,
                "tint": CHANNEL_TINTS[index % len(CHANNEL_TINTS)],
                "low": low,
                "high": high,
                "min": float(plane.min()),
                "max": float(plane.max()),
            }
        )
    objects = {}
    for obj in ("nuclei", "cells"):
        labels = _field_labels(job, field, obj, settings)
        if labels is not None:
            ids = np.unique(labels)
            objects[obj] = {"count": int(np.count_nonzero(ids)), "colour": bytes(OUTLINE_COLOURS[obj]).hex()}
    return {
        "field": field,
        "well": meta.get("well"),
        "width": int(image.shape[2]),
        "height": int(image.shape[1]),
        "dtype": str(image.dtype),
        "channels": channels,
        "objects": objects,
    }


@router.get(
    "/{job_id}/view/{field}/channel/{index}.png",
    summary="One channel of a field, tinted, full size",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def field_channel(
    job_id: str,
    field: str,
    index: int,
    session: SessionDep,
    settings: SettingsDep,
    principal: InstrumentDep,
    low: Annotated[float | None, Query(allow_inf_nan=False)] = None,
    high: Annotated[float | None, Query(allow_inf_nan=False)] = None,
    tint: Annotated[str | None, Query(pattern=r"^[0-9a-fA-F]{6}$")] = None,
) -> Response:
    job = get_visible_job(session, job_id, principal)
    image = _field_image(job, _field(job, field), settings)
    if not 0 <= index < image.shape[0]:
        raise Problem(
            404,
            f"field {field!r} has {image.shape[0]} channel(s); there is no channel {index}",
            slug="channel-not-found",
        )
    auto_low, auto_high = exports.display_range(image[index])
    low = auto_low if low is None else low
    high = auto_high if high is None else high
    if high <= low:
        raise Problem(422, f"the display range needs high > low; got low={low}, high={high}", slug="bad-range")
    tint = tint or CHANNEL_TINTS[index % len(CHANNEL_TINTS)]
    rgb = [int(tint[i : i + 2], 16) / 255.0 for i in (0, 2, 4)]
    return _png(exports.channel_layer_png(image[index], low, high, rgb))


@router.get(
    "/{job_id}/view/{field}/outlines/{obj}.png",
    summary="Object outlines of a field, transparent",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def field_outlines(
    job_id: str, field: str, obj: str, session: SessionDep, settings: SettingsDep, principal: InstrumentDep
) -> Response:
    job = get_visible_job(session, job_id, principal)
    _field(job, field)
    if obj not in OUTLINE_COLOURS:
        raise Problem(404, f"no outlines named {obj!r}; choose nuclei or cells", slug="result-not-found")
    labels = _field_labels(job, field, obj, settings)
    if labels is None:
        raise Problem(
            404, f"field {field!r} has no {obj} (they were not asked for, or the field failed)", slug="result-not-found"
        )
    return _png(exports.outline_layer_png(labels, OUTLINE_COLOURS[obj]))


@router.get("/{job_id}/view/{field}/pick", summary="The nucleus and cell under one pixel, with their measurements")
def field_pick(
    job_id: str,
    field: str,
    session: SessionDep,
    settings: SettingsDep,
    principal: InstrumentDep,
    x: Annotated[int, Query(ge=0, le=1_000_000)],
    y: Annotated[int, Query(ge=0, le=1_000_000)],
) -> dict[str, Any]:
    job = get_visible_job(session, job_id, principal)
    _field(job, field)
    found: dict[str, int] = {}
    for obj in ("nuclei", "cells"):
        labels = _field_labels(job, field, obj, settings)
        if labels is not None and y < labels.shape[0] and x < labels.shape[1]:
            found[obj] = int(labels[y, x])
    rows = []
    for row in _measurements(job, field, settings):
        own = {"nucleus": found.get("nuclei"), "cell": found.get("cells")}.get(row.get("object", ""))
        if own and str(own) == row.get("label"):
            rows.append(row)
    return {"x": x, "y": y, "nucleus_label": found.get("nuclei", 0), "cell_label": found.get("cells", 0), "rows": rows}


# ----------------------------------------------------------------------------------------------
# a plate


def _number(value: str | None) -> float | None:
    try:
        number = float(value) if value not in (None, "") else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


@router.get("/{job_id}/plate", summary="Per well: fields, object counts and the median of every measurement")
def plate_summary(job_id: str, session: SessionDep, settings: SettingsDep, principal: InstrumentDep) -> dict[str, Any]:
    job = get_visible_job(session, job_id, principal)
    summary = job.summary or {}
    done = {f["field"]: f for f in summary.get("fields", [])}
    failed = {f["field"]: f.get("error", "") for f in summary.get("failed_fields", [])}
    wells: dict[str, dict[str, Any]] = {}
    columns: set[str] = set()
    for field in (job.params or {}).get("fields", []):
        name, well = field.get("name"), str(field.get("well") or "")
        entry = wells.setdefault(well, {"well": well, "fields": [], "failed": [], "counts": {}, "values": {}})
        if name in failed:
            entry["failed"].append({"field": name, "error": failed[name]})
            continue
        if name not in done:
            entry["fields"].append(name)  # not segmented yet (job still running)
            continue
        entry["fields"].append(name)
        for obj, count in (done[name].get("objects") or {}).items():
            entry["counts"][obj] = entry["counts"].get(obj, 0) + int(count)
        for row in _measurements(job, name, settings):
            kind = row.get("object", "")
            for key, value in row.items():
                if key in ("object", "label", "nucleus_label", "cell_label") or key.startswith("bbox_"):
                    continue
                number = _number(value)
                if number is not None:
                    column = f"{kind}:{key}"
                    columns.add(column)
                    entry["values"].setdefault(column, []).append(number)
    for entry in wells.values():
        entry["medians"] = {k: statistics.median(v) for k, v in entry.pop("values").items() if v}
    return {
        "plate": (job.params or {}).get("plate"),
        "wells": sorted(wells.values(), key=lambda w: w["well"]),
        "measures": sorted(columns),
    }
