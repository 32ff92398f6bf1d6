"""Rank every non-empty subset of a cell line's channels for one object on a labelled split, store
the smallest set within noise of the best as the zoo's channel set for that (cell line, object),
and (Flow Fusion) fit the fusion parameters of that set on the same fields.

Each channel is run at its own model's diameter, as in segmentation. The ranking rows carry a
bootstrap 95 % interval of F1 over the fields; the fitted parameters (weights, thresholds,
confidence, cross-validated F1 and its interval) are stored with the channel set and used by
segmentation for exactly that set and those model versions.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from app.job_params import SelectChannelsJob
from app.models import ChannelSet
from workers.pipelines.common import (
    LoadedModel,
    inference_options,
    labelled_split,
    load_labelled,
    load_version,
    zoo_source,
)
from workers.pipelines.preprocess import dataset_plate_preprocessing
from workers.runner import JobContext


def run(ctx: JobContext) -> dict[str, Any]:
    from app.science.backbone import predict_maps_multi
    from app.science.channel_sets import choose_channel_set, rank_channel_subsets
    from app.science.fusion_fitting import fit_fusion_parameters
    from app.science.segmentation import reconstruction_size

    p = ctx.params_as(SelectChannelsJob)
    obj = p.object
    ds, rows = labelled_split(ctx, p.dataset_id, p.split, obj)
    plan = p.plan[obj]
    cache: dict[Any, LoadedModel] = {}
    loaded = [load_version(ctx, plan.models[name], cache) for name in plan.channels]
    models = [m.channel_model(name) for m, name in zip(loaded, plan.channels, strict=True)]
    diameter, diam_mean = reconstruction_size(models)
    indices = [ds.channels.index(name) for name in plan.channels]
    # Each channel's model's own recipe: the fusion is fitted on the maps segmentation will see.
    prep = dataset_plate_preprocessing(
        ctx, ds, {obj: {name: zoo_source(ctx, plan.models[name]) for name in plan.channels}}, ds.channels
    )
    maps_per_image, truths = [], []
    items = load_labelled(ctx, rows, obj)
    for i, it in enumerate(items):
        ctx.progress(f"network maps for image {i + 1} of {len(items)}", 0.6 * i / len(items))
        image, normalizations = prep.inputs(obj, plan.channels, it.image, ds.channels)
        maps_per_image.append(
            predict_maps_multi(
                [m.net for m in models],
                image,
                diameter=[m.diameter for m in models],
                normalizations=normalizations,
                checkpoint=lambda: ctx.progress(),
                precision=inference_options(ctx)["precision"],
            )
        )
        truths.append(it.mask)
    ctx.progress(f"scoring {2 ** len(indices) - 1} channel subsets", 0.6)
    ranking = rank_channel_subsets(
        maps_per_image, truths, plan.channels, diameter=diameter, diam_mean=diam_mean, method=p.method, metric=p.metric
    )
    ranking_rows = [_subset_row(r) for r in ranking]
    chosen = list(choose_channel_set(ranking))
    fusion = None
    if p.method == "flow_fusion":
        ctx.progress(f"fitting Flow Fusion for {' + '.join(chosen)}", 0.8)
        picked = [plan.channels.index(name) for name in chosen]
        sub_diameter, sub_diam_mean = reconstruction_size([models[k] for k in picked])
        record = fit_fusion_parameters(
            [[maps[k] for k in picked] for maps in maps_per_image],
            truths,
            chosen,
            diameter=sub_diameter,
            diam_mean=sub_diam_mean,
        )
        fusion = record.to_dict()
        # Fitted for these model versions: segmentation uses it only while they are the ones resolved.
        fusion["models"] = {name: plan.models[name] for name in chosen}
        fusion["split"] = p.split
    row = ctx.session.scalar(select(ChannelSet).where(ChannelSet.job_id == ctx.job_id))
    if row is None:
        row = ChannelSet(
            cell_line_id=ds.cell_line_id,
            object=obj,
            method=p.method,
            ranking=ranking_rows,
            chosen=chosen,
            dataset_id=ds.id,
            job_id=ctx.job_id,
            fusion_parameters=fusion,
        )
        ctx.session.add(row)
    else:
        row.ranking, row.chosen, row.fusion_parameters = ranking_rows, chosen, fusion
    ctx.session.commit()
    body = {
        "cell_line": ds.cell_line.name,
        "object": obj,
        "method": p.method,
        "metric": p.metric,
        "chosen": chosen,
        "ranking": ranking_rows,
        "fusion_parameters": fusion,
        "preprocessing": prep.record()[obj],
        "selection_rule": "the smallest subset within noise of the best (the best's F1 higher in < 90 % of "
        "paired bootstrap resamples of the fields)",
    }
    ctx.add_result(
        "channel_ranking.json", json.dumps(body, indent=2).encode(), kind="metrics", media_type="application/json"
    )
    return body


def _subset_row(score) -> dict[str, Any]:
    out: dict[str, Any] = {"channels": list(score.channels)}
    for key in ("f1", "precision", "recall", "jaccard", "map_50_95"):
        out[key] = round(float(getattr(score, key)), 4)
    out["f1_interval"] = None if score.f1_interval is None else [round(float(x), 4) for x in score.f1_interval]
    out["within_noise_of_best"] = bool(score.within_noise)
    out["p_best_better"] = round(float(score.p_best_better), 3)
    out["n_fields"] = int(score.n_fields)
    return out
