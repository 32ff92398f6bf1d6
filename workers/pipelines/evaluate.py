"""Evaluate one model version on its reporter's channel, or a fusion of channels, on a labelled split.

The evaluation is recorded with the test set's identity (pixels and masks), which is what the alias
gate compares.
"""

from __future__ import annotations

import json
from typing import Any

from app.job_params import EvaluateJob
from workers.pipelines.common import (
    LoadedModel,
    compute_provenance,
    evaluation_set_identity,
    inference_options,
    labelled_split,
    load_labelled,
    load_version,
    model_source,
    record_evaluation,
    segment_object,
    zoo_source,
)
from workers.pipelines.preprocess import dataset_plate_preprocessing
from workers.runner import JobContext, JobFailed


def run(ctx: JobContext) -> dict[str, Any]:
    from app.science.backbone import masks_from_maps, predict_maps
    from app.science.metrics import score_set

    p = ctx.params_as(EvaluateJob)
    obj = p.object
    ds, rows = labelled_split(ctx, p.dataset_id, p.split, obj)
    items = load_labelled(
        ctx, rows, obj, on_image=lambda i: ctx.progress(f"loading image {i + 1} of {len(rows)}", 0.1 * i / len(rows))
    )
    cache: dict[Any, LoadedModel] = {}
    options = inference_options(ctx)
    preds = []
    fusion = None
    if p.model_version_id is not None:
        loaded = load_version(ctx, p.model_version_id, cache)
        if p.reporter not in ds.channels:
            raise JobFailed(f"dataset {ds.id} no longer has a channel {p.reporter!r}")
        # The model's own recipe (illumination, plate percentiles), as it was trained and segments.
        prep = dataset_plate_preprocessing(
            ctx, ds, {obj: {p.reporter: zoo_source(ctx, p.model_version_id)}}, ds.channels
        )
        for i, it in enumerate(items):
            ctx.progress(f"image {i + 1} of {len(items)}", 0.1 + 0.9 * i / len(items))
            inputs, normalizations = prep.inputs(obj, [p.reporter], it.image, ds.channels)
            maps = predict_maps(
                loaded.net,
                inputs[0],
                diameter=loaded.diameter,
                normalization=normalizations[0],
                tile=False,
                precision=options["precision"],
            )
            preds.append(
                masks_from_maps(
                    maps.maps, diameter=loaded.diameter, diam_mean=loaded.diam_mean, device=options["mask_device"]
                )
            )
    else:
        if p.plan is None or p.method is None:
            raise JobFailed("this evaluation names neither a model version nor a fusion plan")
        plan = p.plan[obj]
        used: dict = {}
        diameters: list[dict] = []
        sources = {name: model_source(ctx, plan, name) for name in plan.channels}
        prep = dataset_plate_preprocessing(ctx, ds, {obj: sources}, ds.channels)
        for i, it in enumerate(items):
            ctx.progress(f"image {i + 1} of {len(items)}", 0.1 + 0.9 * i / len(items))
            preds.append(
                segment_object(ctx, it.image, ds.channels, plan, p.method, p.params, cache, used, obj=obj, prep=prep)
            )
            diameters.append({"image": it.row.id, **{k: used.get(k) for k in ("diameter", "diameter_source")}})
        # What was applied (weights, thresholds, their source): the same for every image of the split.
        fusion = {
            "cell_line": ds.cell_line.name,
            "object": obj,
            "channels": plan.channels,
            "method": p.method,
            "models": plan.models,
            "base_models": plan.base_models,
            "settings": used,
            # Each image may be segmented at its own (estimated) diameter.
            "diameters": diameters,
        }
    metrics = score_set([it.mask for it in items], preds).as_dict()
    record_evaluation(
        ctx,
        ds.id,
        p.split,
        metrics,
        evaluation_set_identity(it.digest for it in items),
        model_version_id=p.model_version_id,
        fusion=fusion,
    )
    body = {
        "dataset_id": ds.id,
        "split": p.split,
        "object": obj,
        "n_images": len(items),
        "model_version_id": p.model_version_id,
        "fusion": fusion,
        # Per channel: the recipe applied, its profile (id, sha256) and the dataset's percentiles.
        "preprocessing": prep.record()[obj],
        "metrics": metrics,
        "compute": compute_provenance(ctx),
    }
    ctx.add_result("metrics.json", json.dumps(body, indent=2).encode(), kind="metrics", media_type="application/json")
    return body
