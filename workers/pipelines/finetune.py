"""Fine-tune one model for a (cell line, reporter, object) from a base or a zoo version.

The version row exists while training (the zoo shows it); a re-run of the job reuses it. Version
numbers are allocated under the table's unique constraint, so two concurrent fine-tunes of the same
(cell line, reporter, object) get consecutive numbers instead of one failing.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.job_params import FinetuneJob, FinetuneParams
from app.models import BaseModel, Dataset, DatasetImage, ModelVersion, Reporter
from workers.pipelines.common import (
    PREPROCESSING,
    LabelledImage,
    library_versions,
    load_labelled,
    load_version,
    load_weights,
    mask_sha,
    model_version,
    record_evaluation,
    evaluation_set_identity,
)
from workers.runner import JobContext, JobFailed

log = logging.getLogger(__name__)

#: Attempts at taking the next version number when a concurrent fine-tune took it first.
VERSION_NUMBER_ATTEMPTS = 20


def _assign_splits(ctx: JobContext, labelled: list[DatasetImage], tp: FinetuneParams) -> None:
    """Images without a split get one (fixed by the seed); the splits are stored with the dataset."""
    from app.science.training import split_dataset

    unassigned = [im for im in labelled if im.split is None]
    if not unassigned:
        return
    split = split_dataset(len(unassigned), n_train=tp.n_train, n_val=tp.n_val, n_test=tp.n_test, seed=tp.seed)
    for name, indices in (("train", split.train), ("val", split.val), ("test", split.test)):
        for i in indices:
            unassigned[i].split = name
    ctx.session.commit()


def _create_version(ctx: JobContext, **columns: Any) -> ModelVersion:
    from app.zoo import next_version_number

    for _ in range(VERSION_NUMBER_ATTEMPTS):
        number = next_version_number(ctx.session, columns["cell_line_id"], columns["reporter_id"], columns["object"])
        version = ModelVersion(version=number, **columns)
        ctx.session.add(version)
        try:
            ctx.session.commit()
            return version
        except IntegrityError:  # a concurrent fine-tune took this number: take the next one
            ctx.session.rollback()
    raise JobFailed("could not allocate a model version number: too many concurrent fine-tunes")


def run(ctx: JobContext) -> dict[str, Any]:
    from app.science import weights
    from app.science.training import TrainingCancelled, TrainingConfig, finetune

    p = ctx.params_as(FinetuneJob)
    tp = p.params
    ds = ctx.session.get(Dataset, p.dataset_id)
    if ds is None:
        raise JobFailed(f"dataset {p.dataset_id} no longer exists")
    obj = p.object
    if p.reporter not in ds.channels:
        raise JobFailed(f"dataset {ds.id} no longer has a channel {p.reporter!r}")
    channel = ds.channels.index(p.reporter)
    reporter = ctx.session.scalar(select(Reporter).where(Reporter.name == p.reporter))
    if reporter is None:
        raise JobFailed(f"reporter {p.reporter!r} was deleted; register it again to fine-tune for it")

    splits: dict[str, list[LabelledImage]] = {}
    with ctx.stage("loading data", 0.01):
        labelled = [im for im in ds.images if mask_sha(im, obj)]
        _assign_splits(ctx, labelled, tp)
        for name in ("train", "val", "test"):
            splits[name] = load_labelled(ctx, [im for im in labelled if im.split == name], obj,
                                         on_image=lambda _i: ctx.progress())
        if not splits["train"]:
            raise JobFailed("no training images: every labelled image is in the validation or test split")

    def channel_of(items: list[LabelledImage]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [it.image[channel].astype(np.float32) for it in items], [it.mask for it in items]

    by_split = {name: channel_of(items) for name, items in splits.items()}

    with ctx.stage("loading base model", 0.03):
        base_row, parent = None, None
        if p.parent_version_id is not None:
            parent = model_version(ctx, p.parent_version_id)
            base_net = load_version(ctx, parent.id, {}).net
            base_name = f"version:{parent.id}"
        else:
            base_row = ctx.session.scalar(select(BaseModel).where(BaseModel.name == p.base))
            if base_row is None:
                raise JobFailed(f"base model {p.base!r} is no longer registered")
            base_net = load_weights(ctx, base_row.weights_sha256, base_row.card or {}, base_row.source)
            base_name = base_row.name

    version = ctx.session.scalar(select(ModelVersion).where(ModelVersion.job_id == ctx.job_id))
    if version is None:
        version = _create_version(
            ctx, cell_line_id=ds.cell_line_id, reporter_id=reporter.id, object=obj, status="training",
            base_model_id=base_row.id if base_row else None, parent_version_id=parent.id if parent else None,
            dataset_id=ds.id, job_id=ctx.job_id, training_params=tp.model_dump(mode="json"))
    else:
        version.status, version.training_curve = "training", []
        ctx.session.commit()

    overrides = {k: getattr(tp, k) for k in ("learning_rate", "weight_decay") if getattr(tp, k) is not None}
    config = TrainingConfig(max_epochs=tp.max_epochs, min_epochs=min(tp.min_epochs, tp.max_epochs),
                            patience=tp.patience, batch_size=tp.batch_size, bsize=tp.bsize,
                            augment=tp.augment, microscopy_augment=tp.microscopy_augment, seed=tp.seed,
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
        raise JobCancelled(ctx.job_id) from None

    with ctx.stage("size model", 0.87):
        size_model = _fit_size_model(result, by_split["train"])
    with ctx.stage("evaluating on the test split", 0.9):
        test_images, test_masks = by_split["test"]
        metrics = _score_single(result.net, test_images, test_masks, result.diameter) if test_images else {}

    with ctx.stage("style reference", 0.95):
        extra = {"style_reference": _style_reference(result, by_split["train"][0] + by_split["val"][0])}
        if weights.network_widths(result.net) == weights.FULL_WIDTHS:
            # Cellpose's own file for scientists who run Cellpose directly (full-width nets only).
            exported = weights.export_cellpose(result.net, ctx.folder.path / "model" / "cellpose_model")
            extra["cellpose_weights_sha256"] = ctx.blobs.put_bytes(exported.read_bytes()).sha256

    with ctx.stage("saving", 0.97):
        card = weights.ModelCard(
            name=f"{ds.cell_line.name}-{p.reporter}-{obj}", version=str(version.version),
            architecture=weights.architecture_of(result.net), diameter=float(result.diameter),
            reporter=p.reporter, cell_line=ds.cell_line.name, object=obj,
            training={**config.to_dict(), "best_epoch": result.best_epoch, "stop_reason": result.stop_reason,
                      "n_train": result.n_train, "n_val": result.n_val},
            data={"dataset_id": ds.id, "channel_index": channel, "preprocessing": PREPROCESSING},
            data_hashes={name: evaluation_set_identity(it.digest for it in splits[name]) for name in ("train", "test")},
            metrics={"test": metrics}, library_versions=library_versions(), parent=base_name,
            size_model=size_model, extra=extra)
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
        if splits["test"]:
            record_evaluation(ctx, ds.id, "test", metrics, evaluation_set_identity(it.digest for it in splits["test"]),
                              model_version_id=version.id)
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


def _style_reference(result, images: list[np.ndarray]) -> dict[str, Any] | None:
    """Centroid and spread of the training images' styles, computed as segmentation computes them
    (per-image normalisation, the training diameter): plate QC measures reporter drift against it."""
    from app.science.backbone import predict_maps_multi
    from app.science.plate_qc import style_reference

    if not images:
        return None
    styles = [predict_maps_multi([result.net], im[np.newaxis], diameter=[float(result.diameter)])[0].style
              for im in images]
    return style_reference(styles)


def _score_single(net, images: list[np.ndarray], masks: list[np.ndarray], diameter: float) -> dict[str, Any]:
    from app.science.backbone import masks_from_maps, predict_maps
    from app.science.metrics import score_set

    preds = []
    diam_mean = float(net.diam_mean.item())
    for image in images:
        maps = predict_maps(net, image, diameter=diameter, tile=False)
        preds.append(masks_from_maps(maps.maps, diameter=diameter, diam_mean=diam_mean))
    return score_set(masks, preds).as_dict()
