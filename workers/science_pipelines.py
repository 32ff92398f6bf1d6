"""The science jobs: fine-tune, segment, evaluate, select channels.

Each reads its inputs from the database and the blob store, calls the pure science core, writes its
files under its own job folder and records rows at the end. A re-run (after a lost worker) starts
from a clean folder and updates the rows it created the first time instead of adding new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select

from app.models import (
    BaseModel,
    ChannelSet,
    Dataset,
    DatasetImage,
    Evaluation,
    ModelVersion,
    Reporter,
)
from workers.runner import JobContext, JobFailed

log = logging.getLogger(__name__)

PREPROCESSING = {"normalization": "per-image percentiles 1–99 per channel (Cellpose's normalize99)"}


# ---------------------------------------------------------------------------------------------
# Loading inputs


def _read_blob(ctx: JobContext, sha256: str) -> bytes:
    try:
        return ctx.blobs.read_bytes(sha256)
    except KeyError as exc:
        raise JobFailed(f"a stored file ({sha256[:12]}…) is missing from the data directory") from exc


def _image(ctx: JobContext, sha256: str) -> np.ndarray:
    from app.science.imageio import read_image

    return read_image(_read_blob(ctx, sha256), max_pixels=ctx.settings.max_image_pixels).data


def _labels(ctx: JobContext, sha256: str | None) -> np.ndarray | None:
    from app.science.imageio import read_labels

    return None if sha256 is None else read_labels(_read_blob(ctx, sha256))


def _mask_sha(image: DatasetImage, obj: str) -> str | None:
    return image.nuclei_sha256 if obj == "nuclei" else image.cells_sha256


def test_set_sha256(images: list[DatasetImage], obj: str) -> str:
    """'The same test set' means the same image and mask bytes, whatever the dataset is called."""
    digest = hashlib.sha256()
    for im in sorted(images, key=lambda i: (i.image_sha256, _mask_sha(i, obj) or "")):
        digest.update(im.image_sha256.encode())
        digest.update((_mask_sha(im, obj) or "").encode())
    return digest.hexdigest()


@dataclass
class LoadedModel:
    net: Any
    diameter: float
    diam_mean: float
    name: str
    weights_sha256: str


def _load_weights(ctx: JobContext, sha256: str, card: dict[str, Any], source: str) -> Any:
    from app.science import weights

    path = ctx.blobs.path_for(sha256)
    if not path.is_file():
        raise JobFailed(f"the weights of {card.get('name', 'the model')} ({sha256[:12]}…) are not in the "
                        "data directory")
    if source == "cellpose" or card.get("format") == "cellpose-state-dict":
        if weights.file_sha256(path) != sha256:
            raise JobFailed(f"the weights of {card.get('name')} do not match their sha256")
        net = weights.import_cellpose_file(path)
        net.diam_mean.data[:] = float(card.get("diam_mean", 30.0))
        return net
    net, _card = weights.load_model(path, card=weights.ModelCard.from_dict(_card_for_loading(card)),
                                    expected_sha256=sha256)
    return net


def _card_for_loading(card: dict[str, Any]) -> dict[str, Any]:
    if "architecture" in card:
        return card
    return {**card, "name": card.get("name", "upload"), "version": card.get("version", "upload"),
            "architecture": {"type": "cellpose-cpnet", "widths": card.get("widths", [32, 64, 128, 256]),
                             "nchan": 2, "nout": 3}}


def load_version(ctx: JobContext, version_id: int, cache: dict[int, LoadedModel]) -> LoadedModel:
    if version_id not in cache:
        version = ctx.session.get(ModelVersion, version_id)
        if version is None or version.weights_sha256 is None:
            raise JobFailed(f"model version {version_id} has no weights")
        net = _load_weights(ctx, version.weights_sha256, version.card or {}, "zoo")
        cache[version_id] = LoadedModel(net=net, diameter=float(version.diameter or 30.0),
                                        diam_mean=float(net.diam_mean.item()),
                                        name=f"{version.reporter.name}/{version.object}/v{version.version}",
                                        weights_sha256=version.weights_sha256)
    return cache[version_id]


def _library_versions() -> dict[str, str]:
    from app.science.weights import library_versions

    return library_versions()


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def _assign_splits(ctx: JobContext, ds: Dataset, labelled: list[DatasetImage], params: dict[str, Any]) -> None:
    """Images without a split get one (fixed by the seed); the splits are stored with the dataset."""
    from app.science.training import split_dataset

    unassigned = [im for im in labelled if im.split is None]
    if not unassigned:
        return
    split = split_dataset(len(unassigned), n_train=params["n_train"], n_val=params["n_val"],
                          n_test=params["n_test"], seed=params["seed"])
    for name, indices in (("train", split.train), ("val", split.val), ("test", split.test)):
        for i in indices:
            unassigned[i].split = name
    ctx.session.commit()


def finetune_pipeline(ctx: JobContext) -> dict[str, Any]:
    from app.science import weights
    from app.science.training import TrainingCancelled, TrainingConfig, finetune

    p = ctx.params
    tp = p["params"]
    ds = ctx.session.get(Dataset, p["dataset_id"])
    if ds is None:
        raise JobFailed(f"dataset {p['dataset_id']} no longer exists")
    obj, reporter_name = p["object"], p["reporter"]
    channel = ds.channels.index(reporter_name)
    reporter = ctx.session.scalar(select(Reporter).where(Reporter.name == reporter_name))

    with ctx.stage("loading data", 0.01):
        labelled = [im for im in ds.images if _mask_sha(im, obj)]
        _assign_splits(ctx, ds, labelled, tp)
        by_split: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {"train": ([], []), "val": ([], []),
                                                                           "test": ([], [])}
        for im in labelled:
            if im.split in by_split:
                by_split[im.split][0].append(_image(ctx, im.image_sha256)[channel].astype(np.float32))
                by_split[im.split][1].append(_labels(ctx, _mask_sha(im, obj)))
        if not by_split["train"][0]:
            raise JobFailed("no training images: every labelled image is in the validation or test split")

    with ctx.stage("loading base model", 0.03):
        base_row, parent = None, None
        if p["base"].startswith("version:"):
            parent = ctx.session.get(ModelVersion, int(p["base"].split(":", 1)[1]))
            base_net = load_version(ctx, parent.id, {}).net
            base_name = f"version:{parent.id}"
        else:
            base_row = ctx.session.scalar(select(BaseModel).where(BaseModel.name == p["base"]))
            if base_row is None:
                raise JobFailed(f"base model {p['base']!r} is no longer registered")
            base_net = _load_weights(ctx, base_row.weights_sha256, base_row.card or {}, base_row.source)
            base_name = base_row.name

    # The version row exists while training, so the zoo shows it; a re-run reuses it.
    version = ctx.session.scalar(select(ModelVersion).where(ModelVersion.job_id == ctx.job_id))
    if version is None:
        from app.zoo import next_version_number

        version = ModelVersion(cell_line_id=ds.cell_line_id, reporter_id=reporter.id, object=obj,
                               version=next_version_number(ctx.session, ds.cell_line_id, reporter.id, obj),
                               status="training", base_model_id=base_row.id if base_row else None,
                               parent_version_id=parent.id if parent else None, dataset_id=ds.id,
                               job_id=ctx.job_id, training_params=tp)
        ctx.session.add(version)
        ctx.session.commit()
    else:
        version.status, version.training_curve = "training", []
        ctx.session.commit()

    overrides = {k: tp[k] for k in ("learning_rate", "weight_decay") if tp.get(k) is not None}
    config = TrainingConfig(max_epochs=tp["max_epochs"], min_epochs=min(tp["min_epochs"], tp["max_epochs"]),
                            patience=tp["patience"], batch_size=tp["batch_size"], bsize=tp["bsize"],
                            augment=tp["augment"], microscopy_augment=tp["microscopy_augment"], seed=tp["seed"],
                            flow_cache_dir=str(ctx.settings.resolved_data_dir / "flow-cache"), **overrides)
    curve: list[dict[str, Any]] = []

    def on_epoch(report) -> None:
        curve.append({"epoch": report.epoch, "train_loss": round(float(report.train_loss), 5),
                      "val_loss": None if np.isnan(report.val_loss) else round(float(report.val_loss), 5),
                      "elapsed_s": round(float(report.elapsed_s), 2)})
        ctx.progress(f"training: epoch {report.epoch} of at most {config.max_epochs}",
                     0.05 + 0.8 * min(1.0, report.epoch / config.max_epochs),
                     summary={"training_curve": curve, "model_version_id": version.id}, force=True)

    try:
        with ctx.stage("training", 0.05):
            result = finetune(base_net, *by_split["train"], *by_split["val"], config, on_epoch=on_epoch,
                              should_stop=ctx.cancel_requested)
    except TrainingCancelled:
        from app.jobs import JobCancelled

        version.status = "failed"
        ctx.session.commit()
        raise JobCancelled(ctx.job_id)

    with ctx.stage("size model", 0.87):
        size_model = _fit_size_model(result, by_split["train"])
    with ctx.stage("evaluating on the test split", 0.9):
        test_images, test_masks = by_split["test"]
        metrics = _score_single(result.net, test_images, test_masks, result.diameter) if test_images else {}

    with ctx.stage("saving", 0.97):
        card = weights.ModelCard(
            name=f"{ds.cell_line.name}-{reporter_name}-{obj}", version=str(version.version),
            architecture=weights.architecture_of(result.net), diameter=float(result.diameter),
            reporter=reporter_name, cell_line=ds.cell_line.name, object=obj,
            training={**config.to_dict(), "best_epoch": result.best_epoch, "stop_reason": result.stop_reason,
                      "n_train": result.n_train, "n_val": result.n_val},
            data={"dataset_id": ds.id, "channel_index": channel, "preprocessing": PREPROCESSING},
            data_hashes={"train": test_set_sha256([im for im in labelled if im.split == "train"], obj),
                         "test": test_set_sha256([im for im in labelled if im.split == "test"], obj)},
            metrics={"test": metrics}, library_versions=_library_versions(), parent=base_name,
            size_model=size_model)
        saved = weights.save_model(result.net, card, ctx.folder.path / "model", "model")
        weights_blob = ctx.blobs.put_bytes(saved.weights_path.read_bytes())
        ctx.add_result("model/card.json", saved.card_path.read_bytes(), kind="model_card",
                       media_type="application/json")
        ctx.add_result("training_curve.json", json.dumps(curve).encode(), kind="training_curve",
                       media_type="application/json")
        version.weights_sha256 = weights_blob.sha256
        version.card = saved.card.to_dict()
        version.diameter = float(result.diameter)
        version.test_metrics = metrics
        version.training_curve = curve
        version.status = "ready"
        test_rows = [im for im in labelled if im.split == "test"]
        if test_rows:
            _record_evaluation(ctx, ds.id, "test", obj, metrics, test_rows, model_version_id=version.id)
        ctx.session.commit()
    return {"model_version_id": version.id, "version": version.version, "best_epoch": result.best_epoch,
            "stop_reason": result.stop_reason, "test_metrics": metrics, "diameter": result.diameter,
            "training_curve": curve}


def _fit_size_model(result, train: tuple[list[np.ndarray], list[np.ndarray]]) -> dict[str, Any] | None:
    from app.science.backbone import predict_maps
    from app.science.size_model import SizeModelError, fit_size_model
    from app.science.training import image_diameters

    images, masks = train
    if len(images) < 2:
        return None
    # Styles at the image's own scale (no rescaling), as at inference when the diameter is unknown.
    raw_scale = float(result.net.diam_mean.item())
    styles = np.stack([predict_maps(result.net, im, diameter=raw_scale, tile=False).style for im in images])
    diameters = image_diameters(masks)
    try:
        return fit_size_model(styles, diameters, diam_mean=float(result.net.diam_mean.item())).to_dict()
    except SizeModelError as exc:
        log.info("no size model: %s", exc)
        return None


def _score_single(net, images: list[np.ndarray], masks: list[np.ndarray], diameter: float) -> dict[str, Any]:
    from app.science.backbone import masks_from_maps, predict_maps
    from app.science.metrics import score_set

    preds = []
    diam_mean = float(net.diam_mean.item())
    for image in images:
        maps = predict_maps(net, image, diameter=diameter, tile=False)
        preds.append(masks_from_maps(maps.maps, diameter=diameter, diam_mean=diam_mean))
    return score_set(masks, preds).as_dict()


def _record_evaluation(ctx: JobContext, dataset_id: int, split: str, obj: str, metrics: dict[str, Any],
                       images: list[DatasetImage], *, model_version_id: int | None = None,
                       fusion: dict[str, Any] | None = None) -> None:
    row = ctx.session.scalar(select(Evaluation).where(Evaluation.job_id == ctx.job_id,
                                                      Evaluation.model_version_id == model_version_id))
    if row is None:
        row = Evaluation(job_id=ctx.job_id, model_version_id=model_version_id, dataset_id=dataset_id, split=split,
                         test_set_sha256=test_set_sha256(images, obj), metrics=metrics, fusion=fusion)
        ctx.session.add(row)
    else:
        row.metrics, row.fusion = metrics, fusion
    ctx.session.commit()


# ---------------------------------------------------------------------------------------------
# Segmentation


def _channel_models(ctx: JobContext, plan_for_object: dict[str, Any], cache: dict[int, LoadedModel]):
    from app.science.segmentation import ChannelModel

    models = []
    for name in plan_for_object["channels"]:
        loaded = load_version(ctx, plan_for_object["models"][name], cache)
        models.append(ChannelModel(net=loaded.net, diameter=loaded.diameter, diam_mean=loaded.diam_mean,
                                   name=name))
    return models


def _segment_object(ctx: JobContext, image: np.ndarray, channels: list[str], plan_for_object: dict[str, Any],
                    method: str, seg_params: dict[str, Any], cache: dict[int, LoadedModel]) -> np.ndarray:
    from app.science.segmentation import segment_field

    from dataclasses import replace

    models = _channel_models(ctx, plan_for_object, cache)
    indices = [channels.index(name) for name in plan_for_object["channels"]]
    if seg_params.get("diameter"):
        models = [replace(m, diameter=float(seg_params["diameter"])) for m in models]
    elif seg_params.get("estimate_diameter"):
        estimated = _estimate_diameter(ctx, image[indices], plan_for_object, cache)
        if estimated is not None:
            models = [replace(m, diameter=estimated) for m in models]
    result = segment_field(image[indices], models, method=method, flow_threshold=seg_params.get("flow_threshold"),
                           cellprob_threshold=seg_params.get("cellprob_threshold", 0.0),
                           min_size=seg_params.get("min_size", 15))
    return result.labels


def _estimate_diameter(ctx: JobContext, image: np.ndarray, plan_for_object: dict[str, Any],
                       cache: dict[int, LoadedModel]) -> float | None:
    """Per-image diameter from the channels' size models (Cellpose 3's SizeModel), averaged."""
    from app.science.backbone import predict_maps
    from app.science.size_model import SizeModel

    estimates = []
    for k, name in enumerate(plan_for_object["channels"]):
        version = ctx.session.get(ModelVersion, plan_for_object["models"][name])
        size_params = (version.card or {}).get("size_model")
        if not size_params:
            continue
        loaded = load_version(ctx, version.id, cache)
        style = predict_maps(loaded.net, image[k].astype(np.float32), diameter=loaded.diam_mean, tile=False).style
        estimates.append(float(SizeModel.from_dict(size_params).predict(style)))
    return float(np.mean(estimates)) if estimates else None


def _provenance(ctx: JobContext, p: dict[str, Any]) -> dict[str, Any]:
    models = {}
    for obj, plan in p["plan"].items():
        versions = {name: ctx.session.get(ModelVersion, vid) for name, vid in plan["models"].items()}
        models[obj] = {name: {"model_version_id": v.id, "weights_sha256": v.weights_sha256, "diameter": v.diameter}
                       for name, v in versions.items()}
    return {"job_id": ctx.job_id, "cell_line": p["cell_line"], "channels": p["channels"], "method": p["method"],
            "fused_channels": {obj: plan["channels"] for obj, plan in p["plan"].items()},
            "channel_source": {obj: plan["channel_source"] for obj, plan in p["plan"].items()},
            "models": models, "preprocessing": PREPROCESSING, "parameters": p.get("params", {}),
            "library_versions": _library_versions()}


def segment_pipeline(ctx: JobContext) -> dict[str, Any]:
    from app.science import exports
    from app.science.imageio import labels_to_tiff_bytes
    from app.science.metrics import score, score_set

    p = ctx.params
    fields = p["fields"]
    seg_params = p.get("params", {})
    cache: dict[int, LoadedModel] = {}
    done, failed = [], []
    truths: dict[str, list[np.ndarray]] = {obj: [] for obj in p["objects"]}
    preds: dict[str, list[np.ndarray]] = {obj: [] for obj in p["objects"]}
    provenance = _provenance(ctx, p)
    ctx.add_result("provenance.json", json.dumps(provenance, indent=2).encode(), kind="provenance",
                   media_type="application/json")
    for index, field in enumerate(fields):
        name = field["name"]
        ctx.progress(f"field {index + 1} of {len(fields)} ({name})", index / len(fields))
        started = time.perf_counter()
        try:
            image = _image(ctx, field["image_sha256"])
            labels = {obj: _segment_object(ctx, image, p["channels"], p["plan"][obj], p["method"], seg_params, cache)
                      for obj in p["objects"]}
            nuclei, cells = labels.get("nuclei"), labels.get("cells")
            for obj, lab in labels.items():
                ctx.add_result(f"{name}/{obj}.tif", labels_to_tiff_bytes(lab), kind=f"{obj}_mask",
                               media_type="image/tiff", meta={"field": name, "objects": int(lab.max())})
                ctx.add_result(f"{name}/{obj}_rois.zip", exports.imagej_rois_zip(lab, prefix=obj),
                               kind=f"{obj}_rois", media_type="application/zip", meta={"field": name})
            base = nuclei if nuclei is not None else cells
            rows = exports.measure_cells(base, cells if nuclei is not None else None, image, p["channels"])
            table = exports.measurements_csv(rows, columns=exports.measurement_columns(p["channels"]))
            ctx.add_result(f"{name}/measurements.csv", table, kind="measurements",
                           media_type="text/csv", meta={"field": name, "rows": len(rows)})
            preview_channel = min(int(seg_params.get("preview_channel", 0)), image.shape[0] - 1)
            ctx.add_result(f"{name}/overlay.png",
                           exports.overlay_png(image, nuclei if nuclei is not None else np.zeros_like(cells),
                                               cells if cells is not None else np.zeros_like(nuclei),
                                               channel=preview_channel),
                           kind="overlay", media_type="image/png", meta={"field": name})
            field_metrics = {}
            image_row = ctx.session.get(DatasetImage, field["dataset_image_id"]) if field.get("dataset_image_id") else None
            if image_row is not None:
                for obj, lab in labels.items():
                    truth = _labels(ctx, _mask_sha(image_row, obj))
                    if truth is not None:
                        field_metrics[obj] = score(truth, lab).as_dict()
                        truths[obj].append(truth)
                        preds[obj].append(lab)
            if field_metrics:
                ctx.add_result(f"{name}/metrics.json", json.dumps(field_metrics, indent=2).encode(), kind="metrics",
                               media_type="application/json", meta={"field": name})
            done.append({"field": name, "well": field.get("well"), "objects": {o: int(l.max()) for o, l in labels.items()},
                         "seconds": round(time.perf_counter() - started, 2), "metrics": field_metrics})
        except JobFailed as exc:
            failed.append({"field": name, "error": str(exc)})
        except Exception as exc:  # one bad field does not fail the plate; it is listed with its reason
            from app.jobs import JobCancelled

            if isinstance(exc, JobCancelled):
                raise
            log.exception("field %s failed", name)
            failed.append({"field": name, "error": f"{type(exc).__name__}: {exc}"})
    if not done:
        raise JobFailed(f"every field failed; first error: {failed[0]['error'] if failed else 'no fields'}")
    pooled = {obj: score_set(truths[obj], preds[obj]).as_dict() for obj in p["objects"] if truths[obj]}
    summary = {"fields_done": len(done), "fields_failed": len(failed), "failed_fields": failed, "fields": done,
               "method": p["method"], "fused_channels": provenance["fused_channels"], "metrics": pooled}
    ctx.add_result("metrics.json", json.dumps({"method": p["method"], "pooled": pooled, "fields": done},
                                              indent=2).encode(), kind="metrics", media_type="application/json")
    return summary


# ---------------------------------------------------------------------------------------------
# Evaluation and channel-set selection


def _labelled_split(ctx: JobContext, dataset_id: int, split: str, obj: str) -> tuple[Dataset, list[DatasetImage]]:
    ds = ctx.session.get(Dataset, dataset_id)
    if ds is None:
        raise JobFailed(f"dataset {dataset_id} no longer exists")
    images = [im for im in ds.images if im.split == split and _mask_sha(im, obj)]
    if not images:
        raise JobFailed(f"dataset {dataset_id} has no {obj}-labelled images in split {split!r}")
    return ds, images


def evaluate_pipeline(ctx: JobContext) -> dict[str, Any]:
    from app.science.metrics import score_set

    p = ctx.params
    obj = p["object"]
    ds, images = _labelled_split(ctx, p["dataset_id"], p["split"], obj)
    cache: dict[int, LoadedModel] = {}
    truths, preds = [], []
    if p.get("model_version_id"):
        loaded = load_version(ctx, p["model_version_id"], cache)
        channel = ds.channels.index(p["reporter"])
        from app.science.backbone import masks_from_maps, predict_maps

        for i, im in enumerate(images):
            ctx.progress(f"image {i + 1} of {len(images)}", i / len(images))
            maps = predict_maps(loaded.net, _image(ctx, im.image_sha256)[channel].astype(np.float32),
                                diameter=loaded.diameter, tile=False)
            preds.append(masks_from_maps(maps.maps, diameter=loaded.diameter, diam_mean=loaded.diam_mean))
            truths.append(_labels(ctx, _mask_sha(im, obj)))
        fusion = None
    else:
        for i, im in enumerate(images):
            ctx.progress(f"image {i + 1} of {len(images)}", i / len(images))
            preds.append(_segment_object(ctx, _image(ctx, im.image_sha256), ds.channels, p["plan"][obj], p["method"],
                                         {}, cache))
            truths.append(_labels(ctx, _mask_sha(im, obj)))
        fusion = {"cell_line": ds.cell_line.name, "object": obj, "channels": p["plan"][obj]["channels"],
                  "method": p["method"], "models": p["plan"][obj]["models"]}
    metrics = score_set(truths, preds).as_dict()
    _record_evaluation(ctx, ds.id, p["split"], obj, metrics, images, model_version_id=p.get("model_version_id"),
                       fusion=fusion)
    body = {"dataset_id": ds.id, "split": p["split"], "object": obj, "n_images": len(images),
            "model_version_id": p.get("model_version_id"), "fusion": fusion, "metrics": metrics}
    ctx.add_result("metrics.json", json.dumps(body, indent=2).encode(), kind="metrics", media_type="application/json")
    return body


def select_channels_pipeline(ctx: JobContext) -> dict[str, Any]:
    from app.science.backbone import predict_maps_multi
    from app.science.channel_sets import rank_channel_subsets

    p = ctx.params
    obj = p["object"]
    ds, images = _labelled_split(ctx, p["dataset_id"], p["split"], obj)
    plan = p["plan"][obj]
    cache: dict[int, LoadedModel] = {}
    loaded = [load_version(ctx, plan["models"][name], cache) for name in plan["channels"]]
    diameter = float(np.mean([m.diameter for m in loaded]))
    diam_mean = float(np.mean([m.diam_mean for m in loaded]))
    indices = [ds.channels.index(name) for name in plan["channels"]]
    maps_per_image, truths = [], []
    for i, im in enumerate(images):
        ctx.progress(f"network maps for image {i + 1} of {len(images)}", 0.6 * i / len(images))
        image = _image(ctx, im.image_sha256)[indices].astype(np.float32)
        maps_per_image.append(predict_maps_multi([m.net for m in loaded], image, diameter=diameter))
        truths.append(_labels(ctx, _mask_sha(im, obj)))
    ctx.progress(f"scoring {2 ** len(indices) - 1} channel subsets", 0.6)
    ranking = rank_channel_subsets(maps_per_image, truths, plan["channels"], diameter=diameter, diam_mean=diam_mean,
                                   method=p["method"], metric=p["metric"])
    ranking_rows = [_subset_row(r) for r in ranking]
    chosen = list(ranking[0].channels)
    row = ctx.session.scalar(select(ChannelSet).where(ChannelSet.job_id == ctx.job_id))
    if row is None:
        row = ChannelSet(cell_line_id=ds.cell_line_id, object=obj, method=p["method"], ranking=ranking_rows,
                         chosen=chosen, dataset_id=ds.id, job_id=ctx.job_id)
        ctx.session.add(row)
    else:
        row.ranking, row.chosen = ranking_rows, chosen
    ctx.session.commit()
    body = {"cell_line": ds.cell_line.name, "object": obj, "method": p["method"], "metric": p["metric"],
            "chosen": chosen, "ranking": ranking_rows}
    ctx.add_result("channel_ranking.json", json.dumps(body, indent=2).encode(), kind="metrics",
                   media_type="application/json")
    return body


def _subset_row(score) -> dict[str, Any]:
    out = {"channels": list(score.channels)}
    for key in ("f1", "precision", "recall", "jaccard", "map_50_95"):
        out[key] = round(float(getattr(score, key)), 4)
    return out


__all__ = ["finetune_pipeline", "segment_pipeline", "evaluate_pipeline", "select_channels_pipeline"]
