"""Fine-tune one model for a (cell line, reporter, object) from a base or a zoo version.

The version row exists while training (the zoo shows it); a re-run of the job reuses it. Version
numbers are allocated under the table's unique constraint, so two concurrent fine-tunes of the same
(cell line, reporter, object) get consecutive numbers instead of one failing.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.job_params import FinetuneJob, FinetuneParams
from app.models import BaseNetwork, Dataset, DatasetImage, ModelVersion, Reporter
from workers.pipelines.common import (
    store_trained_version,
    LabelledImage,
    inference_options,
    library_versions,
    load_labelled,
    load_version,
    load_weights,
    mask_sha,
    model_version,
    record_evaluation,
    evaluation_set_identity,
)
from workers.compute import worker_compute
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
            splits[name] = load_labelled(
                ctx, [im for im in labelled if im.split == name], obj, on_image=lambda _i: ctx.progress()
            )
        if not splits["train"]:
            raise JobFailed("no training images: every labelled image is in the validation or test split")

    with ctx.stage("preprocessing", 0.02):
        from workers.pipelines.common import read_field
        from workers.pipelines.preprocess import dataset_preprocessing

        # The recipe is fitted on every image of the dataset (labelled or not), as on a plate.
        loaded = {it.row.id: it.image for items in splits.values() for it in items}
        planes = [(loaded[im.id] if im.id in loaded else read_field(ctx, im.image_sha256))[channel] for im in ds.images]
        prepare, preprocessing_record, prenormalised = dataset_preprocessing(
            ctx, tp.preprocessing, p.reporter, planes, ds.id
        )

    def channel_of(items: list[LabelledImage]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        return [prepare(it.image[channel]) for it in items], [it.mask for it in items]

    by_split = {name: channel_of(items) for name, items in splits.items()}

    with ctx.stage("loading base model", 0.03):
        base_row, parent = None, None
        if p.parent_version_id is not None:
            parent = model_version(ctx, p.parent_version_id)
            base_net = load_version(ctx, parent.id, {}).net
            base_name = f"version:{parent.id}"
        else:
            base_row = ctx.session.scalar(select(BaseNetwork).where(BaseNetwork.name == p.base))
            if base_row is None:
                raise JobFailed(f"base model {p.base!r} is no longer registered")
            base_net = load_weights(ctx, base_row.weights_sha256, base_row.card or {}, base_row.source)
            base_name = base_row.name

    version = ctx.session.scalar(select(ModelVersion).where(ModelVersion.job_id == ctx.job_id))
    if version is None:
        version = _create_version(
            ctx,
            cell_line_id=ds.cell_line_id,
            reporter_id=reporter.id,
            object=obj,
            status="training",
            base_model_id=base_row.id if base_row else None,
            parent_version_id=parent.id if parent else None,
            dataset_id=ds.id,
            job_id=ctx.job_id,
            training_params=tp.model_dump(mode="json"),
        )
    else:
        version.status, version.training_curve = "training", []
        ctx.session.commit()

    overrides = {k: getattr(tp, k) for k in ("learning_rate", "weight_decay") if getattr(tp, k) is not None}
    config = TrainingConfig(
        max_epochs=tp.max_epochs,
        min_epochs=min(tp.min_epochs, tp.max_epochs),
        patience=tp.patience,
        batch_size=tp.batch_size,
        bsize=tp.bsize,
        augment=tp.augment,
        microscopy_augment=tp.microscopy_augment,
        seed=tp.seed,
        flow_cache_dir=str(ctx.settings.resolved_data_dir / "flow-cache"),
        normalize_per_image=not prenormalised,
        **overrides,
    )
    resume_from = _load_checkpoint(ctx)
    curve: list[dict[str, Any]] = [_curve_point(r) for r in resume_from.history] if resume_from else []
    if resume_from is not None:
        ctx.progress(
            f"training: resuming after epoch {resume_from.epoch} (its checkpoint)",
            force=True,
            summary={"training_curve": curve, "model_version_id": version.id, "resumed_after_epoch": resume_from.epoch},
        )
    resumed = {"resumed_after_epoch": resume_from.epoch} if resume_from is not None else {}
    last_saved = [time.monotonic()]

    def on_checkpoint(checkpoint) -> None:
        # Written at most every checkpoint_interval_s: a full CPnet state is tens of MB.
        if time.monotonic() - last_saved[0] >= ctx.settings.checkpoint_interval_s:
            _save_checkpoint(ctx, checkpoint)
            last_saved[0] = time.monotonic()

    def on_epoch(report) -> None:
        curve.append(_curve_point(report))
        ctx.progress(
            f"training: epoch {report.epoch} of at most {config.max_epochs}",
            0.05 + 0.8 * min(1.0, report.epoch / config.max_epochs),
            summary={"training_curve": curve, "model_version_id": version.id, **resumed},
            force=True,
        )

    try:
        with ctx.stage("training", 0.05):
            compute = worker_compute(ctx.settings)
            result = finetune(
                base_net,
                *by_split["train"],
                *by_split["val"],
                config,
                on_epoch=on_epoch,
                should_stop=ctx.cancel_requested,
                on_checkpoint=on_checkpoint,
                resume_from=resume_from,
                device=compute.device,
                precision=compute.training_precision,
            )
    except TrainingCancelled:
        from app.jobs import JobCancelled

        version.status = "failed"
        ctx.session.commit()
        raise JobCancelled(ctx.job_id) from None

    with ctx.stage("size model", 0.87):
        size_model = _fit_size_model(result, by_split["train"], prenormalised)
    with ctx.stage("evaluating on the test split", 0.9):
        test_images, test_masks = by_split["test"]
        metrics = (
            _score_single(result.net, test_images, test_masks, result.diameter, prenormalised, **inference_options(ctx))
            if test_images
            else {}
        )

    with ctx.stage("style reference", 0.95):
        extra = {"style_reference": _style_reference(result, by_split["train"][0] + by_split["val"][0], prenormalised)}
        if weights.network_widths(result.net) == weights.FULL_WIDTHS:
            # Cellpose's own file for scientists who run Cellpose directly (full-width nets only).
            exported = weights.export_cellpose(result.net, ctx.folder.path / "model" / "cellpose_model")
            extra["cellpose_weights_sha256"] = ctx.blobs.put_bytes(exported.read_bytes()).sha256

    with ctx.stage("saving", 0.97):
        card = weights.ModelCard(
            name=f"{ds.cell_line.name}-{p.reporter}-{obj}",
            version=str(version.version),
            architecture=weights.architecture_of(result.net),
            diameter=float(result.diameter),
            reporter=p.reporter,
            cell_line=ds.cell_line.name,
            object=obj,
            training={
                **config.to_dict(),
                "best_epoch": result.best_epoch,
                "stop_reason": result.stop_reason,
                "n_train": result.n_train,
                "n_val": result.n_val,
                "device": result.device,
                "precision": result.precision,
                "device_name": compute.device_name,
            },
            data={"dataset_id": ds.id, "channel_index": channel, "preprocessing": preprocessing_record},
            data_hashes={name: evaluation_set_identity(it.digest for it in splits[name]) for name in ("train", "test")},
            metrics={"test": metrics},
            library_versions=library_versions(),
            parent=base_name,
            size_model=size_model,
            extra=extra,
        )
        store_trained_version(ctx, version, result.net, card, curve, metrics, result.diameter)
        if splits["test"]:
            record_evaluation(
                ctx,
                ds.id,
                "test",
                metrics,
                evaluation_set_identity(it.digest for it in splits["test"]),
                model_version_id=version.id,
            )
        ctx.session.commit()
    return {
        "model_version_id": version.id,
        "version": version.version,
        "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason,
        "test_metrics": metrics,
        "diameter": result.diameter,
        "training_curve": curve,
        **resumed,
    }


CHECKPOINT_FILE = "finetune.pt"


def _curve_point(report) -> dict[str, Any]:
    return {
        "epoch": report.epoch,
        "train_loss": round(float(report.train_loss), 5),
        "val_loss": None if np.isnan(report.val_loss) else round(float(report.val_loss), 5),
        "elapsed_s": round(float(report.elapsed_s), 2),
    }


def _save_checkpoint(ctx: JobContext, checkpoint) -> None:
    """The training state after an epoch, written atomically (a kill mid-write keeps the previous one)."""
    import torch

    from app.storage import StorageError

    path = ctx.checkpoint_dir / CHECKPOINT_FILE
    tmp = path.with_name(path.name + ".partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as out:
            torch.save(checkpoint.as_state(), out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise StorageError(errno.ENOSPC, "the data directory is full; free space and retry") from exc
        log.warning("could not write the training checkpoint of job %s", ctx.job_id, exc_info=True)


def _load_checkpoint(ctx: JobContext):
    """The last saved training state of an earlier attempt of this job, or None."""
    import torch

    from app.science.training import TrainingCheckpoint

    path = ctx.checkpoint_dir / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        return TrainingCheckpoint.from_state(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # a damaged checkpoint costs the time it saved, nothing more
        log.warning("ignoring the unreadable training checkpoint of job %s", ctx.job_id, exc_info=True)
        return None


def _input_normalization(prenormalised: bool):
    """Images already scaled by dataset percentiles pass through unchanged; others per image."""
    from app.science.backbone import Normalization

    return Normalization(low=0.0, high=1.0) if prenormalised else Normalization()


def _fit_size_model(
    result, train: tuple[list[np.ndarray], list[np.ndarray]], prenormalised: bool = False
) -> dict[str, Any] | None:
    from app.science.backbone import predict_maps
    from app.science.size_model import SizeModelError, fit_size_model
    from app.science.training import image_diameters

    images, masks = train
    if len(images) < 2:
        return None
    # Styles at the image's own scale (no rescaling), as at inference when the diameter is unknown.
    raw_scale = float(result.net.diam_mean.item())
    norm = _input_normalization(prenormalised)
    styles = np.stack(
        [predict_maps(result.net, im, diameter=raw_scale, normalization=norm, tile=False).style for im in images]
    )
    diameters = image_diameters(masks)
    try:
        return fit_size_model(styles, diameters, diam_mean=float(result.net.diam_mean.item())).to_dict()
    except SizeModelError as exc:
        log.info("no size model: %s", exc)
        return None


def _style_reference(result, images: list[np.ndarray], prenormalised: bool = False) -> dict[str, Any] | None:
    """Centroid and spread of the training images' styles, computed as segmentation computes them
    (the same normalisation, the training diameter): plate QC measures reporter drift against it."""
    from app.science.backbone import predict_maps_multi
    from app.science.plate_qc import style_reference

    if not images:
        return None
    norm = _input_normalization(prenormalised)
    styles = [
        predict_maps_multi([result.net], im[np.newaxis], diameter=[float(result.diameter)], normalizations=norm)[
            0
        ].style
        for im in images
    ]
    return style_reference(styles)


def _score_single(
    net,
    images: list[np.ndarray],
    masks: list[np.ndarray],
    diameter: float,
    prenormalised: bool = False,
    *,
    precision: str = "fp32",
    mask_device=None,
) -> dict[str, Any]:
    from app.science.backbone import masks_from_maps, predict_maps
    from app.science.metrics import score_set

    preds = []
    diam_mean = float(net.diam_mean.item())
    for image in images:
        maps = predict_maps(
            net,
            image,
            diameter=diameter,
            normalization=_input_normalization(prenormalised),
            tile=False,
            precision=precision,
        )
        preds.append(masks_from_maps(maps.maps, diameter=diameter, diam_mean=diam_mean, device=mask_device))
    return score_set(masks, preds).as_dict()
