"""Segment a plate (uploaded fields or a dataset's images): every field, every object, with the
request's fusion method; masks, ROIs, measurements, an overlay and (for labelled images) metrics.

Fields go through ``app.science.plate.segment_fields`` (batched networks, reading, correction and
mask reconstruction overlapped with them) on this worker's device and precision, recorded in the
provenance. One bad field does not fail the plate: it is listed with its reason. A cancellation takes effect
between fields and between channels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Generator
from contextlib import ExitStack, closing
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np

from app.jobs import JobCancelled
from app.job_params import SegmentJob
from app.models import DatasetImage
from workers.compute import worker_compute
from workers.pipelines.common import (
    DiameterChoice,
    LoadedModel,
    channel_models,
    compute_provenance,
    estimate_object_diameter,
    given_diameter_choice,
    library_versions,
    mask_sha,
    model_source,
    read_field,
    read_mask,
    segment_object,
)
from workers.runner import JobContext, JobFailed

log = logging.getLogger(__name__)


def _provenance(ctx: JobContext, p: SegmentJob, preprocessing: dict[str, Any]) -> dict[str, Any]:
    models = {
        obj: {name: model_source(ctx, plan, name).provenance() for name in plan.channels}
        for obj, plan in p.plan.items()
    }
    return {
        "job_id": ctx.job_id,
        "cell_line": p.cell_line,
        "channels": p.channels,
        "method": p.method,
        "fused_channels": {obj: plan.channels for obj, plan in p.plan.items()},
        "fusion": {
            obj: {
                "parameters": plan.fusion if p.method == "flow_fusion" else None,
                "source": (
                    plan.fusion_source
                    if plan.fusion and p.method == "flow_fusion"
                    else "defaults (equal weights)"
                    if p.method == "flow_fusion"
                    else None
                ),
            }
            for obj, plan in p.plan.items()
        },
        "channel_source": {obj: plan.channel_source for obj, plan in p.plan.items()},
        "models": models,
        "preprocessing": preprocessing,
        "preprocessing_override": p.params.preprocessing is not None,
        "parameters": p.params.model_dump(mode="json"),
        "library_versions": library_versions(),
        "compute": compute_provenance(ctx),
    }


def _finished_fields(ctx: JobContext, names: set[str]) -> dict[str, dict[str, Any]]:
    """Fields an earlier attempt of this job finished: field name -> its record."""
    folder = ctx.checkpoint_dir / "fields"
    finished = {}
    for path in folder.glob("*.json") if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a damaged record: the field is simply redone
        name = record.get("done", {}).get("field")
        if name in names and ctx.folder.file(f"{name}/measurements.csv").is_file():
            finished[name] = record
    return finished


def _record_finished(ctx: JobContext, name: str, done: dict[str, Any], scored: list[str], qc: dict[str, Any]) -> None:
    """Written after all of a field's results: a re-run skips the field (and takes its QC row from here)."""
    folder = ctx.checkpoint_dir / "fields"
    target = folder / f"{hashlib.sha256(name.encode()).hexdigest()[:32]}.json"
    tmp = target.with_name(target.name + ".partial")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"done": done, "scored": scored, "qc": qc}))
        os.replace(tmp, target)
    except OSError:  # without the record the field is redone on a re-run, nothing worse
        log.warning("could not record field %s of job %s as finished", name, ctx.job_id, exc_info=True)


def _tasks(
    ctx: JobContext,
    p: SegmentJob,
    cache: dict[Any, LoadedModel],
    prep,
    sample: np.ndarray,
    diameters: dict[str, DiameterChoice],
):
    """One SegmentTask per object over the stacked inputs ``_plate_inputs`` makes, with the
    request's method and thresholds, the plate's diameter per object and the preprocessing's
    (plate-constant) normalisations."""
    from app.science.plate import SegmentTask

    seg = p.params
    tasks, offset = {}, len(p.channels)
    for obj in p.objects:
        plan = p.plan[obj]
        models = channel_models(ctx, plan, cache)
        value = diameters[obj].value
        if value is not None:
            models = [replace(m, diameter=float(value)) for m in models]
        _inputs, norms = prep.inputs(obj, plan.channels, sample, p.channels)
        tasks[obj] = SegmentTask(
            tuple(models),
            channels=tuple(range(offset, offset + len(plan.channels))),
            method=p.method,
            normalizations=tuple(norms),
            flow_threshold=seg.flow_threshold,
            cellprob_threshold=seg.cellprob_threshold,
            min_size=seg.min_size,
            fusion=plan.fusion if p.method == "flow_fusion" else None,
        )
        offset += len(plan.channels)
    return tasks


class _BlockedField(Exception):
    """A field the plate route hands to the one-field route, which segments it in blocks."""


def _plate_inputs(ctx: JobContext, p: SegmentJob, prep, sha256: str) -> np.ndarray:
    """The raw field and, after it, each object's preprocessed network inputs, as one stack (read
    and corrected on the plate engine's reader thread: blob files and arrays only)."""
    image = read_field(ctx, sha256)
    if p.method == "flow_fusion" and image.shape[-2] * image.shape[-1] > ctx.settings.segment_block_pixels:
        raise _BlockedField  # too large for a batch: segment_object segments it in blocks
    stacks = [image.astype(np.float32)]
    for obj in p.objects:
        stacks.append(prep.inputs(obj, p.plan[obj].channels, image, p.channels)[0])
    return np.concatenate(stacks)


def _estimation_mode(p: SegmentJob) -> str:
    """Without a diameter: a plate's fields share one magnification, so one estimate serves them all;
    a dataset's images may not (public sets mix magnifications), so each gets its own."""
    return p.params.estimation("per-field" if p.dataset_id is not None else "per-plate")


def _plate_diameters(
    ctx: JobContext, p: SegmentJob, cache, prep, read_any, too_large
) -> dict[str, DiameterChoice | None]:
    """Per object, the diameter every field uses unless it gives its own: the request's; or, with
    estimate_diameter "per-plate", the median of the two-pass size-model estimates of up to three
    fields (first, middle, last: the same ones on a re-run); "model default" when off or when no
    fused channel's model has a size model. None: each field is estimated on its own."""
    seg, mode = p.params, _estimation_mode(p)
    out: dict[str, DiameterChoice | None] = {}
    picks = sorted({0, len(p.fields) // 2, len(p.fields) - 1}) if p.fields else []
    samples: list[tuple[str, np.ndarray]] | None = None
    for obj in p.objects:
        given = given_diameter_choice(seg, obj)
        if given is not None:
            out[obj] = given
        elif mode == "off":
            out[obj] = DiameterChoice(None, "model default")
        elif not any(model_source(ctx, p.plan[obj], name).size_model for name in p.plan[obj].channels):
            out[obj] = DiameterChoice(None, "model default (no size model)")  # nothing to estimate with
        elif mode == "per-field":
            out[obj] = None
        else:
            if samples is None:
                samples = []
                for i in picks:
                    if too_large(p.fields[i]):  # a stitched well is not read whole for an estimate
                        continue
                    try:
                        image = read_any(p.fields[i])
                    except Exception:  # noqa: BLE001 - a field that cannot be read fails on its own later
                        log.warning("diameter estimate: field %s unreadable", p.fields[i].name, exc_info=True)
                        continue
                    if image.shape[-2] * image.shape[-1] <= ctx.settings.segment_block_pixels:
                        samples.append((p.fields[i].name, image))
            values, per_field = [], []
            plan = p.plan[obj]
            for name, image in samples:
                inputs, norms = prep.inputs(obj, plan.channels, image, p.channels)
                value, records = estimate_object_diameter(ctx, inputs, plan, cache, seg, norms)
                if value is not None:
                    values.append(value)
                per_field.append({"field": name, "diameter": value, "channels": records})
            if values:
                estimate = {"fields": per_field, "median_of": len(values)}
                out[obj] = DiameterChoice(float(np.median(values)), "plate estimate", estimate)
            else:
                out[obj] = DiameterChoice(None, "model default (no size model)")
    return out


def _field_diameters(p: SegmentJob, field, plate_diameters: dict[str, DiameterChoice | None]):
    """Per object, the field's own diameter (from the request) or the plate's choice."""
    return {obj: given_diameter_choice(p.params, obj, field.diameter) or plate_diameters[obj] for obj in p.objects}


def _field_outcomes(
    ctx: JobContext,
    p: SegmentJob,
    cache: dict[Any, LoadedModel],
    prep,
    fields: list,
    plate,
    zarr_fields: dict,
    plate_diameters: dict[str, DiameterChoice | None],
    *,
    one_field_route: bool = False,
) -> Generator[tuple, None, None]:
    """(field, image, labels per object, error or None, seconds, settings used per object, style
    vectors per "object:channel", OME-Zarr field or None) for each of ``fields``, in order.

    The plate route (``app.science.plate.segment_fields``): fields read and corrected on a thread,
    batched through each channel model, masks reconstructed beside the network, while this thread
    writes the previous field's results. A per-field diameter (given or estimated) changes the
    models per field, and OME-Zarr fields may be lazy and larger than memory, so those keep the
    one-field-at-a-time route (as does ``CELLFUSE_SEGMENT_ROUTE=per_field``; the plate route is the
    default), and so does each field above ``segment_block_pixels`` (segmented in blocks,
    ``segment_object``).
    """
    seg = p.params
    n_fields = len(p.fields)
    index_of = {f.name: i for i, f in enumerate(p.fields)}
    one_at_a_time = (
        one_field_route
        or any(choice is None for choice in plate_diameters.values())
        or any(f.diameter is not None for f in fields)
        or ctx.settings.segment_route == "per_field"
        or plate is not None
        or not fields
    )
    if one_at_a_time:
        for field in fields:
            index = index_of[field.name]
            ctx.progress(f"field {index + 1} of {n_fields} ({field.name})", index / n_fields, force=True)
            started = time.perf_counter()
            settings: dict[str, dict[str, Any]] = {}
            styles: dict[str, list[float]] = {}
            diameters = _field_diameters(p, field, plate_diameters)
            zf = zarr_fields.get(field.zarr_path) if field.zarr_path else None
            try:
                if field.zarr_path and zf is None:
                    raise JobFailed(f"the plate no longer has the field {field.zarr_path}")
                image = _zarr_image(ctx, plate, zf) if zf is not None else read_field(ctx, field.image_sha256)
                labels: dict[str, np.ndarray] = {}
                for k, obj in enumerate(p.objects):
                    ctx.progress(
                        f"field {index + 1} of {n_fields} ({field.name}): {obj}",
                        (index + k / len(p.objects)) / n_fields,
                    )
                    settings[obj] = {}
                    object_styles: dict[str, list[float]] = {}
                    labels[obj] = segment_object(
                        ctx,
                        image,
                        p.channels,
                        p.plan[obj],
                        p.method,
                        seg,
                        cache,
                        settings[obj],
                        obj=obj,
                        prep=prep,
                        styles_out=object_styles,
                        diameter=diameters[obj],
                    )
                    styles.update({f"{obj}:{channel}": style for channel, style in object_styles.items()})
            except JobCancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - listed with the field by the caller
                yield field, None, None, exc, time.perf_counter() - started, settings, styles, zf
                continue
            yield field, image, labels, None, time.perf_counter() - started, settings, styles, zf
        return

    from app.science.plate import FieldStage, segment_fields

    compute = worker_compute(ctx.settings)
    first = read_field(ctx, fields[0].image_sha256)
    fixed = {obj: choice for obj, choice in plate_diameters.items() if choice is not None}
    tasks = _tasks(ctx, p, cache, prep, first, fixed)
    n_raw, raw_dtype = len(p.channels), first.dtype
    reader = partial(_plate_inputs, ctx, p, prep)  # blob files and arrays only: safe on the reader thread
    last_report = [time.monotonic()]

    def report_stage(in_flight: list[FieldStage]) -> None:
        """Progress inside a long field, and the job's cancel checked between network passes and
        mask tasks (``ctx.progress`` raises JobCancelled, which stops the engine)."""
        if not in_flight or time.monotonic() - last_report[0] < 1.0:
            return
        last_report[0] = time.monotonic()
        head = in_flight[0]
        index = index_of[head.key.name]
        ctx.progress(
            f"field {index + 1} of {n_fields} ({head.key.name}): {head.stage}", (index + head.fraction) / n_fields
        )

    start = 0
    while start < len(fields):
        engine = segment_fields(
            ((field, partial(reader, field.image_sha256)) for field in fields[start:]),
            tasks,
            precision=compute.precision,
            mask_device=compute.device,
            batch_fields=compute.plate_batch_fields or None,
            on_wait=report_stage,
        )
        blocked = None
        with closing(engine):
            for outcome in engine:
                field = outcome.key
                start += 1
                if isinstance(outcome.error, _BlockedField):
                    # Blocked segmentation swaps modules of the shared nets: the engine's threads
                    # stop first (closing), and a new engine takes the fields after this one.
                    blocked = field
                    break
                index = index_of[field.name]
                ctx.progress(f"field {index + 1} of {n_fields} ({field.name})", index / n_fields, force=True)
                labels = {obj: result.labels for obj, result in outcome.results.items()}
                settings = {obj: {**result.settings, **fixed[obj].record()} for obj, result in outcome.results.items()}
                for obj, used in settings.items():  # recorded as segment_object records it
                    if tasks[obj].fusion is not None:
                        used["weights_source"] = p.plan[obj].fusion_source or used.get("weights_source")
                styles = {
                    f"{obj}:{channel}": [round(float(v), 6) for v in maps.style]
                    for obj, result in outcome.results.items()
                    for channel, maps in zip(p.plan[obj].channels, result.channel_maps, strict=True)
                }
                image = None if outcome.image is None else outcome.image[:n_raw].astype(raw_dtype)
                yield field, image, labels, outcome.error, outcome.timings.get("total", 0.0), settings, styles, None
        if blocked is not None:
            yield from _field_outcomes(
                ctx, p, cache, prep, [blocked], plate, zarr_fields, plate_diameters, one_field_route=True
            )


def _dataset_images(ctx: JobContext, dataset_id: int | None) -> list[DatasetImage]:
    """Every image of a segment-dataset job's dataset (none for a plate or an OME-Zarr job)."""
    from app.models import Dataset

    ds = ctx.session.get(Dataset, dataset_id) if dataset_id is not None else None
    return [] if ds is None else list(ds.images)


def run(ctx: JobContext) -> dict[str, Any]:
    # The plate engine's threads stop however the run ends (a cancel or a lost worker while a
    # field's results are written), not whenever the garbage collector finalises its generator.
    with ExitStack() as stack:
        return _run(ctx, stack)


def _run(ctx: JobContext, stack: ExitStack) -> dict[str, Any]:
    from app.jobs import JobCancelled
    from app.science import exports
    from app.science.image_files import labels_to_tiff_bytes, read_labels
    from app.science.metrics import score, score_set

    p = ctx.params_as(SegmentJob)
    seg = p.params
    cache: dict[Any, LoadedModel] = {}
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    truths: dict[str, list[np.ndarray]] = {obj: [] for obj in p.objects}
    preds: dict[str, list[np.ndarray]] = {obj: [] for obj in p.objects}
    # A re-run after a lost worker keeps the fields an earlier attempt finished (their results and
    # a record of each) and redoes the rest.
    # (An OME-Zarr job starts over: its labels live in the plate, and an uploaded plate is unpacked
    # afresh.)
    finished = {} if p.ome_zarr else _finished_fields(ctx, {f.name for f in p.fields})
    ctx.drop_results_except(lambda result: result.split("/", 1)[0] in finished and "/" in result)
    plate = _open_plate(ctx, p)
    zarr_fields = {f.path: f for f in plate.fields} if plate is not None else {}
    well_rows: dict[str, list[dict[str, Any]]] = {}
    qc_fields: list[dict[str, Any]] = []
    owner = ctx.job.owner_key_id

    def too_large(field) -> bool:
        """An OME-Zarr field beyond the block size (its shape is known without reading it)."""
        zf = zarr_fields.get(field.zarr_path) if field.zarr_path else None
        return zf is not None and zf.shape[1] * zf.shape[2] > ctx.settings.segment_block_pixels

    def read_any(field) -> np.ndarray:
        if field.zarr_path:
            return np.asarray(_zarr_image(ctx, plate, zarr_fields[field.zarr_path], in_memory=True))
        return read_field(ctx, field.image_sha256)

    from workers.pipelines.preprocess import plan_plate_preprocessing

    versions = {
        obj: {name: model_source(ctx, plan, name) for name in plan.channels}
        for obj, plan in p.plan.items()
        if obj in p.objects
    }
    # A dataset's recipe is fitted on every image of the dataset, as its fine-tune and evaluate fit it,
    # so segmenting one split scores the same inputs as evaluating it (not a profile and percentiles
    # of that split alone, which for a 2-image test split would be a fallback or another scaling).
    dataset_images = _dataset_images(ctx, p.dataset_id)
    n_fit, read_fit = len(p.fields), lambda: (read_any(f) for f in p.fields)
    if dataset_images:
        n_fit, read_fit = len(dataset_images), lambda: (read_field(ctx, im.image_sha256) for im in dataset_images)
    with ctx.stage("preprocessing", 0.0):
        prep = plan_plate_preprocessing(
            ctx,
            versions,
            seg.preprocessing,
            n_fit,
            read_fit,
            p.channels,
            on_progress=lambda stage: ctx.progress(stage, 0.0, force=True),
        )
    with ctx.stage("diameter", 0.0):
        plate_diameters = _plate_diameters(ctx, p, cache, prep, read_any, too_large)
    provenance = _provenance(ctx, p, prep.record())  # written at the end, with the plate's QC
    provenance["diameters"] = {
        obj: {"mode": _estimation_mode(p), **(choice.record() if choice else {}), "value": choice and choice.value}
        for obj, choice in plate_diameters.items()
    }
    remaining = [f for f in p.fields if f.name not in finished]
    outcomes = stack.enter_context(
        closing(_field_outcomes(ctx, p, cache, prep, remaining, plate, zarr_fields, plate_diameters))
    )
    for field in p.fields:
        name = field.name
        if name in finished:
            record = finished[name]
            done.append(record["done"])
            if record.get("qc"):  # the plate's QC covers the fields kept from the earlier attempt too
                qc_fields.append(record["qc"])
            for obj in record["scored"]:  # pooled metrics need every field's masks
                image_row = ctx.session.get(DatasetImage, field.dataset_image_id)
                truths[obj].append(read_mask(ctx, mask_sha(image_row, obj)))
                preds[obj].append(read_labels(ctx.folder.file(f"{name}/{obj}.tif"), max_pixels=10**12))
            continue
        _field, image, labels, error, seconds, settings, styles, zf = next(outcomes)  # the order of p.fields
        started = time.perf_counter()
        try:
            if error is not None:
                raise error
            if zf is not None:
                for obj, lab in labels.items():
                    _write_zarr_labels(ctx, p, plate, zf, obj, lab, provenance, settings.get(obj) or {})
                if not isinstance(image, np.ndarray):
                    if int(np.prod(image.shape)) <= ctx.settings.max_image_pixels:
                        image = np.asarray(image[:, :, :], dtype=np.float32)  # small enough to measure
                    else:  # a stitched well beyond the pixel limit: labels and QC counts only
                        qc_fields.append(_qc_row(name, field.well, labels, styles, None))
                        done.append(
                            {
                                "field": name,
                                "well": field.well,
                                "field_number": field.field,
                                "objects": {o: int(lab.max()) for o, lab in labels.items()},
                                "seconds": round(seconds + time.perf_counter() - started, 2),
                                "metrics": {},
                                "blocked": True,
                                "settings": settings,
                            }
                        )
                        continue
            qc_row = _qc_row(name, field.well, labels, styles, image)
            qc_fields.append(qc_row)
            nuclei, cells = labels.get("nuclei"), labels.get("cells")
            for obj, lab in labels.items():
                ctx.add_result(
                    f"{name}/{obj}.tif",
                    labels_to_tiff_bytes(lab),
                    kind=f"{obj}_mask",
                    media_type="image/tiff",
                    meta={"field": name, "objects": int(lab.max())},
                )
                ctx.add_result(
                    f"{name}/{obj}_rois.zip",
                    exports.imagej_rois_zip(lab, prefix=obj),
                    kind=f"{obj}_rois",
                    media_type="application/zip",
                    meta={"field": name},
                )
            base = nuclei if nuclei is not None else cells
            rows = exports.measure_cells(base, cells if nuclei is not None else None, image, p.channels)
            table = exports.measurements_csv(rows, columns=exports.measurement_columns(p.channels))
            ctx.add_result(
                f"{name}/measurements.csv",
                table,
                kind="measurements",
                media_type="text/csv",
                meta={"field": name, "rows": len(rows)},
            )
            if zf is not None:
                well_rows.setdefault(zf.well_path, []).extend({"field": zf.index, **row} for row in rows)
            preview_channel = min(seg.preview_channel, image.shape[0] - 1)
            ctx.add_result(
                f"{name}/overlay.png",
                exports.overlay_png(
                    image,
                    nuclei if nuclei is not None else np.zeros_like(cells),
                    cells if cells is not None else np.zeros_like(nuclei),
                    channel=preview_channel,
                ),
                kind="overlay",
                media_type="image/png",
                meta={"field": name},
            )
            field_metrics = {}
            image_row = ctx.session.get(DatasetImage, field.dataset_image_id) if field.dataset_image_id else None
            if image_row is not None:
                for obj, lab in labels.items():
                    truth = read_mask(ctx, mask_sha(image_row, obj))
                    if truth is not None:
                        field_metrics[obj] = score(truth, lab).as_dict()
                        truths[obj].append(truth)
                        preds[obj].append(lab)
            if field_metrics:
                ctx.add_result(
                    f"{name}/metrics.json",
                    json.dumps(field_metrics, indent=2).encode(),
                    kind="metrics",
                    media_type="application/json",
                    meta={"field": name},
                )
            done.append(
                {
                    "field": name,
                    "well": field.well,
                    "field_number": field.field,
                    "objects": {o: int(lab.max()) for o, lab in labels.items()},
                    "seconds": round(seconds + time.perf_counter() - started, 2),
                    "metrics": field_metrics,
                    "settings": settings,
                }
            )
            _record_finished(ctx, name, done[-1], scored=[o for o in labels if field_metrics.get(o)], qc=qc_row)
        except JobCancelled:
            raise
        except JobFailed as exc:
            failed.append({"field": name, "error": str(exc)})
            _field_failed_event(ctx, p, owner, field, str(exc))
        except Exception as exc:  # one bad field does not fail the plate; it is listed with its reason
            log.exception("field %s failed", name)
            failed.append({"field": name, "error": f"{type(exc).__name__}: {exc}"})
            _field_failed_event(ctx, p, owner, field, f"{type(exc).__name__}: {exc}")
    if not done:
        raise JobFailed(f"every field failed; first error: {failed[0]['error'] if failed else 'no fields'}")
    pooled = {obj: score_set(truths[obj], preds[obj]).as_dict() for obj in p.objects if truths[obj]}
    qc = _plate_qc(ctx, p, qc_fields)
    provenance["qc"] = qc
    ctx.add_result(
        "provenance.json", json.dumps(provenance, indent=2).encode(), kind="provenance", media_type="application/json"
    )
    ctx.add_result("qc.json", json.dumps(qc, indent=2).encode(), kind="qc", media_type="application/json")
    zarr_outputs = _finish_plate(ctx, p, plate, well_rows) if plate is not None else None
    summary = {
        "fields_done": len(done),
        "fields_failed": len(failed),
        "failed_fields": failed,
        "fields": done,
        "method": p.method,
        "fused_channels": provenance["fused_channels"],
        "metrics": pooled,
        "fields_resumed": len(finished),
        "precision": provenance["compute"]["precision"],
        "qc": {k: qc[k] for k in ("flagged_fields", "drifted_channels", "summary")},
        "qc_field_stats": [{"field": f["field"], "stats": f["stats"]} for f in qc_fields],
    }
    if zarr_outputs is not None:
        summary["ome_zarr"] = zarr_outputs
    if qc["flags"]:
        from app.webhooks import emit_safely

        emit_safely(
            ctx.session,
            "plate.qc_flagged",
            {
                "job_id": ctx.job_id,
                "plate": p.plate,
                "cell_line": p.cell_line,
                "flags": qc["flags"][:100],
                "flagged_fields": qc["flagged_fields"],
                "drifted_channels": qc["drifted_channels"],
                "links": {"job": f"/api/v1/jobs/{ctx.job_id}"},
            },
            owner_key_id=owner,
            job_id=ctx.job_id,
            plate=p.plate,
        )
    ctx.add_result(
        "metrics.json",
        json.dumps({"method": p.method, "pooled": pooled, "fields": done}, indent=2).encode(),
        kind="metrics",
        media_type="application/json",
    )
    return summary


#: run_job keeps an earlier attempt's results for this pipeline: it resumes field by field.
run.resumable = True


# --- OME-Zarr plates, QC and events -----------------------------------------------------------------


def _open_plate(ctx: JobContext, p: SegmentJob):
    """The plate to read and write: the server folder, or the uploaded zip unpacked in the job folder."""
    if p.ome_zarr is None:
        return None
    from pathlib import Path

    from app.science.ome_zarr_io import OmeZarrError, read_plate
    from app.zipped_plates import ZipPlateError, remove, unpack

    src = p.ome_zarr
    if src.zip_sha256:
        target = ctx.folder.path / "ome-zarr"
        remove(target)  # a re-run starts from the upload again
        try:
            unpack(ctx.blobs.path_for(src.zip_sha256), target, max_bytes=ctx.settings.max_request_bytes)
        except (ZipPlateError, KeyError) as exc:
            raise JobFailed(f"the uploaded plate cannot be unpacked: {exc}") from exc
        root = target / src.root_in_zip if src.root_in_zip not in ("", ".") else target
    else:
        root = Path(src.path or "")
    try:
        plate = read_plate(root, wells=src.wells)
    except OmeZarrError as exc:
        raise JobFailed(f"the OME-Zarr plate cannot be read: {exc}") from exc
    if plate.channel_names != src.channel_names:
        raise JobFailed(f"the plate's channels changed since submission: {plate.channel_names} != {src.channel_names}")
    return plate


def _zarr_image(ctx: JobContext, plate, zf, *, in_memory: bool = False):
    """A field's pixels: in memory when small, else a lazy view that blocked segmentation slices."""
    from app.science.ome_zarr_io import open_field

    view = open_field(plate.root, zf)
    if zf.shape[1] * zf.shape[2] > ctx.settings.segment_block_pixels and not in_memory:
        return view
    return np.asarray(view[:, :, :], dtype=np.float32)


def _write_zarr_labels(
    ctx: JobContext,
    p: SegmentJob,
    plate,
    zf,
    obj: str,
    labels: np.ndarray,
    provenance: dict[str, Any],
    used: dict[str, Any],
) -> None:
    from app.science.ome_zarr_io import write_labels

    seg = p.params
    source = {
        "cellfuse": {
            "job_id": ctx.job_id,
            "object": obj,
            "method": p.method,
            "cell_line": p.cell_line,
            "channels": p.plan[obj].channels,
            "models": provenance["models"][obj],
            # What this field was actually segmented with (``segment_object``'s record).
            "thresholds": {
                "flow_threshold": used.get("flow_threshold", seg.flow_threshold),
                "cellprob_threshold": used.get("cellprob_threshold", seg.cellprob_threshold),
                "cellprob_thresholds": used.get("cellprob_thresholds"),
                "flow_thresholds": used.get("flow_thresholds"),
                "min_size": seg.min_size,
            },
            "diameter": used.get("diameter") or {n: m["diameter"] for n, m in provenance["models"][obj].items()},
            "diameter_source": used.get("diameter_source"),
            "library_versions": provenance["library_versions"],
        }
    }
    write_labels(plate, zf, obj, labels, source)


def _finish_plate(ctx: JobContext, p: SegmentJob, plate, well_rows: dict[str, list[dict[str, Any]]]) -> dict:
    from app.science import exports
    from app.science.ome_zarr_io import well_name, write_well_table

    columns = ["field", *exports.measurement_columns(p.channels)]
    tables = []
    for well_path, rows in sorted(well_rows.items()):
        data = exports.measurements_csv(rows, columns=columns)
        tables.append(write_well_table(plate, well_path, "measurements", data))
        row, column = well_path.split("/")
        ctx.add_result(
            f"{well_name(row, column)}/well_measurements.csv",
            data,
            kind="measurements",
            media_type="text/csv",
            meta={"well": well_name(row, column), "rows": len(rows)},
        )
    out = {"version": plate.version, "labels": list(p.objects), "tables": tables}
    if p.ome_zarr.zip_sha256:
        from app.zipped_plates import zip_folder

        archive = ctx.folder.path / "plate.ome.zarr.zip.tmp"
        zip_folder(plate.root, archive)
        ctx.add_result("plate.ome.zarr.zip", archive.read_bytes(), kind="ome_zarr", media_type="application/zip")
        archive.unlink(missing_ok=True)
        out["download"] = "plate.ome.zarr.zip"
    else:
        out["path"] = str(plate.root)
    return out


def _qc_row(
    name: str, well: str | None, labels: dict[str, np.ndarray], styles: dict[str, list[float]], image: np.ndarray | None
) -> dict:
    from app.science.plate_qc import field_stats

    return {
        "field": name,
        "well": well,
        "stats": {obj: field_stats(lab, image) for obj, lab in labels.items()},
        "styles": styles,
    }


def _plate_qc(ctx: JobContext, p: SegmentJob, qc_fields: list[dict[str, Any]]) -> dict[str, Any]:
    """Robust z-scores against this plate and past plates of the cell line; style drift per channel."""
    from sqlalchemy import select

    from app.models import Job
    from app.science.plate_qc import plate_qc

    history: dict[str, dict[str, list[float]]] = {}
    past = ctx.session.scalars(
        select(Job)
        .where(Job.kind == "segment", Job.status == "succeeded", Job.id != ctx.job_id)
        .order_by(Job.finished_at.desc())
        .limit(200)
    ).all()
    for job in past:
        if (job.params or {}).get("cell_line") != p.cell_line:
            continue
        for row in (job.summary or {}).get("qc_field_stats", []):
            for obj, stats in (row.get("stats") or {}).items():
                for metric, value in stats.items():
                    history.setdefault(obj, {}).setdefault(metric, []).append(float(value))
    references = {}
    for obj, plan in p.plan.items():
        for name in plan.channels:
            card = model_source(ctx, plan, name).card
            ref = card.get("style_reference") or (card.get("extra") or {}).get("style_reference")
            if ref:
                references[f"{obj}:{name}"] = ref
    return plate_qc(qc_fields, history=history, style_references=references)


def _field_failed_event(ctx: JobContext, p: SegmentJob, owner: int | None, field, error: str) -> None:
    from app.webhooks import emit_safely

    emit_safely(
        ctx.session,
        "plate.field_failed",
        {
            "job_id": ctx.job_id,
            "plate": p.plate,
            "field": field.name,
            "well": field.well,
            "field_number": field.field,
            "error": error,
            "links": {"job": f"/api/v1/jobs/{ctx.job_id}"},
        },
        owner_key_id=owner,
        job_id=ctx.job_id,
        plate=p.plate,
    )
