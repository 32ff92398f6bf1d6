"""Segment a plate (uploaded fields or a dataset's images): every field, every object, with the
request's fusion method; masks, ROIs, measurements, an overlay and (for labelled images) metrics.

One bad field does not fail the plate: it is listed with its reason. A cancellation takes effect
between fields and between channels.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np

from app.job_params import SegmentJob
from app.models import DatasetImage
from workers.pipelines.common import (
    PREPROCESSING,
    LoadedModel,
    library_versions,
    mask_sha,
    model_version,
    read_field,
    read_mask,
    segment_object,
)
from workers.runner import JobContext, JobFailed

log = logging.getLogger(__name__)


def _provenance(ctx: JobContext, p: SegmentJob) -> dict[str, Any]:
    models = {}
    for obj, plan in p.plan.items():
        versions = {name: model_version(ctx, vid) for name, vid in plan.models.items()}
        models[obj] = {name: {"model_version_id": v.id, "weights_sha256": v.weights_sha256, "diameter": v.diameter}
                       for name, v in versions.items()}
    return {"job_id": ctx.job_id, "cell_line": p.cell_line, "channels": p.channels, "method": p.method,
            "fused_channels": {obj: plan.channels for obj, plan in p.plan.items()},
            "channel_source": {obj: plan.channel_source for obj, plan in p.plan.items()},
            "models": models, "preprocessing": PREPROCESSING, "parameters": p.params.model_dump(mode="json"),
            "library_versions": library_versions()}


def run(ctx: JobContext) -> dict[str, Any]:
    from app.jobs import JobCancelled
    from app.science import exports
    from app.science.imageio import labels_to_tiff_bytes
    from app.science.metrics import score, score_set

    p = ctx.params_as(SegmentJob)
    seg = p.params
    cache: dict[int, LoadedModel] = {}
    done: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    truths: dict[str, list[np.ndarray]] = {obj: [] for obj in p.objects}
    preds: dict[str, list[np.ndarray]] = {obj: [] for obj in p.objects}
    provenance = _provenance(ctx, p)
    ctx.add_result("provenance.json", json.dumps(provenance, indent=2).encode(), kind="provenance",
                   media_type="application/json")
    n_fields = len(p.fields)
    for index, field in enumerate(p.fields):
        name = field.name
        ctx.progress(f"field {index + 1} of {n_fields} ({name})", index / n_fields, force=True)
        started = time.perf_counter()
        try:
            image = read_field(ctx, field.image_sha256)
            labels = {}
            for k, obj in enumerate(p.objects):
                ctx.progress(f"field {index + 1} of {n_fields} ({name}): {obj}",
                             (index + k / len(p.objects)) / n_fields)
                labels[obj] = segment_object(ctx, image, p.channels, p.plan[obj], p.method, seg, cache)
            nuclei, cells = labels.get("nuclei"), labels.get("cells")
            for obj, lab in labels.items():
                ctx.add_result(f"{name}/{obj}.tif", labels_to_tiff_bytes(lab), kind=f"{obj}_mask",
                               media_type="image/tiff", meta={"field": name, "objects": int(lab.max())})
                ctx.add_result(f"{name}/{obj}_rois.zip", exports.imagej_rois_zip(lab, prefix=obj),
                               kind=f"{obj}_rois", media_type="application/zip", meta={"field": name})
            base = nuclei if nuclei is not None else cells
            rows = exports.measure_cells(base, cells if nuclei is not None else None, image, p.channels)
            table = exports.measurements_csv(rows, columns=exports.measurement_columns(p.channels))
            ctx.add_result(f"{name}/measurements.csv", table, kind="measurements",
                           media_type="text/csv", meta={"field": name, "rows": len(rows)})
            preview_channel = min(seg.preview_channel, image.shape[0] - 1)
            ctx.add_result(f"{name}/overlay.png",
                           exports.overlay_png(image, nuclei if nuclei is not None else np.zeros_like(cells),
                                               cells if cells is not None else np.zeros_like(nuclei),
                                               channel=preview_channel),
                           kind="overlay", media_type="image/png", meta={"field": name})
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
                ctx.add_result(f"{name}/metrics.json", json.dumps(field_metrics, indent=2).encode(), kind="metrics",
                               media_type="application/json", meta={"field": name})
            done.append({"field": name, "well": field.well, "field_number": field.field,
                         "objects": {o: int(lab.max()) for o, lab in labels.items()},
                         "seconds": round(time.perf_counter() - started, 2), "metrics": field_metrics})
        except JobCancelled:
            raise
        except JobFailed as exc:
            failed.append({"field": name, "error": str(exc)})
        except Exception as exc:  # one bad field does not fail the plate; it is listed with its reason
            log.exception("field %s failed", name)
            failed.append({"field": name, "error": f"{type(exc).__name__}: {exc}"})
    if not done:
        raise JobFailed(f"every field failed; first error: {failed[0]['error'] if failed else 'no fields'}")
    pooled = {obj: score_set(truths[obj], preds[obj]).as_dict() for obj in p.objects if truths[obj]}
    summary = {"fields_done": len(done), "fields_failed": len(failed), "failed_fields": failed, "fields": done,
               "method": p.method, "fused_channels": provenance["fused_channels"], "metrics": pooled}
    ctx.add_result("metrics.json", json.dumps({"method": p.method, "pooled": pooled, "fields": done},
                                              indent=2).encode(), kind="metrics", media_type="application/json")
    return summary
