"""Annotation-free training (after Din & Yu, Sci. Rep. 2021): pseudo-labels, then an ordinary fine-tune.

Markers come from a nuclear channel of the dataset, or from a nuclear map an ISL base model predicts
from another channel; the marker-controlled training (``app.science.self_training``) turns them into
instance masks of every image; those pseudo-labels train a (cell line, reporter, object) model exactly
as a fine-tune on annotations would. The model version is marked ``pseudo_labelled``. When some images
of the dataset do carry annotations of the object, the model is scored against them (they were not used).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import select

from app.job_params import SelfTrainJob
from app.models import BaseNetwork, Dataset, ModelVersion, Reporter
from workers.pipelines.common import (
    store_trained_version,
    library_versions,
    load_version,
    load_weights,
    mask_sha,
    model_version,
    read_field,
    read_mask,
)
from workers.pipelines.finetune import _create_version, _fit_size_model, _score_single
from workers.runner import JobContext, JobFailed


def _cancelled(ctx: JobContext, version: ModelVersion | None):
    from app.jobs import JobCancelled

    if version is not None:
        version.status = "failed"
        ctx.session.commit()
    return JobCancelled(ctx.job_id)


def run(ctx: JobContext) -> dict[str, Any]:
    from app.science import weights
    from app.science.image_files import labels_to_tiff_bytes
    from app.science.isl import predict_stain
    from app.science.self_training import SelfTrainConfig, self_train
    from app.science.training import TrainingCancelled, TrainingConfig, finetune

    p = ctx.params_as(SelfTrainJob)
    st, tp = p.self_train, p.params
    ds = ctx.session.get(Dataset, p.dataset_id)
    if ds is None:
        raise JobFailed(f"dataset {p.dataset_id} no longer exists")
    needed = [c for c in (p.reporter, p.marker_channel, p.marker_source_channel, p.foreground_channel) if c]
    missing = [c for c in needed if c not in ds.channels]
    if missing:
        raise JobFailed(f"dataset {ds.id} no longer has channel(s) {', '.join(missing)}")
    reporter = ctx.session.scalar(select(Reporter).where(Reporter.name == p.reporter))
    if reporter is None:
        raise JobFailed(f"reporter {p.reporter!r} was deleted; register it again to train for it")

    with ctx.stage("loading images", 0.01):
        rows = sorted(ds.images, key=lambda im: im.id)
        fields = []
        for row in rows:
            fields.append(read_field(ctx, row.image_sha256))
            ctx.progress()
        if len(rows) < 3:
            raise JobFailed(f"dataset {ds.id} has {len(rows)} image(s); self-training needs at least 3")

    def channel(name: str) -> list[np.ndarray]:
        index = ds.channels.index(name)
        return [f[index].astype(np.float32) for f in fields]

    marker_origin: dict[str, Any]
    with ctx.stage("nuclear markers", 0.03):
        if p.marker_channel:
            marker_images = channel(p.marker_channel)
            marker_origin = {"channel": p.marker_channel}
        else:
            isl_row = ctx.session.scalar(select(BaseNetwork).where(BaseNetwork.name == p.marker_isl_model))
            if isl_row is None:
                raise JobFailed(f"ISL model {p.marker_isl_model!r} is no longer registered")
            isl_net = load_weights(ctx, isl_row.weights_sha256, isl_row.card or {}, isl_row.source)
            isl_diameter = float((isl_row.card or {}).get("diameter") or 0) or None
            marker_images = []
            for image in channel(p.marker_source_channel):
                marker_images.append(predict_stain(isl_net, image, diameter=isl_diameter))
                ctx.progress()
            marker_origin = {
                "isl_model": isl_row.name,
                "isl_weights_sha256": isl_row.weights_sha256,
                "source_channel": p.marker_source_channel,
            }
        # With ISL markers, the predicted nuclear map is also the nuclei's foreground by default.
        predicted_foreground = (
            p.marker_isl_model and p.object == "nuclei" and p.foreground_channel == p.marker_source_channel
        )
        foreground_images = (
            marker_images
            if predicted_foreground or p.foreground_channel == p.marker_channel
            else channel(p.foreground_channel)
        )

    config = SelfTrainConfig(
        epochs=st.epochs,
        patch_scale=st.patch_scale,
        lam=st.lam,
        beta=st.beta,
        learning_rate=st.learning_rate,
        seed=st.seed,
    )

    def on_self_epoch(report) -> None:
        ctx.progress(
            f"pseudo-labelling: epoch {report.epoch} of {config.epochs}",
            0.05 + 0.3 * (report.epoch + 1) / config.epochs,
            force=True,
        )

    try:
        with ctx.stage("pseudo-labelling", 0.05):
            pseudo = self_train(
                marker_images,
                foreground_images,
                diameter=st.diameter,
                config=config,
                on_epoch=on_self_epoch,
                should_stop=ctx.cancel_requested,
            )
    except TrainingCancelled:
        raise _cancelled(ctx, None) from None
    counts = [int(len(np.unique(lab)) - 1) for lab in pseudo.labels]
    with ctx.stage("storing pseudo-labels", 0.36):
        for row, labels in zip(rows, pseudo.labels):
            ctx.add_result(
                f"pseudo_labels/image-{row.id}.tif",
                labels_to_tiff_bytes(labels),
                kind="pseudo_labels",
                media_type="image/tiff",
                meta={"dataset_image_id": row.id, "objects": int(labels.max())},
            )
    usable = [i for i, c in enumerate(counts) if c > 0]
    if len(usable) < 2:
        raise JobFailed(
            f"self-training found objects in only {len(usable)} image(s) (markers per image: "
            f"{[len(m) for m in pseudo.markers]}); check the marker channel and the diameter"
        )
    order = np.random.default_rng(tp.seed).permutation(usable)
    n_val = max(1, round(0.2 * len(order)))
    val_idx, train_idx = sorted(int(i) for i in order[:n_val]), sorted(int(i) for i in order[n_val:])
    with ctx.stage("preprocessing", 0.37):
        from workers.pipelines.preprocess import dataset_preprocessing

        prepare, preprocessing_record, prenormalised = dataset_preprocessing(
            ctx, tp.preprocessing, p.reporter, channel(p.reporter), ds.id
        )
        reporter_images = [prepare(image) for image in channel(p.reporter)]

    with ctx.stage("loading base model", 0.38):
        base_row, parent = None, None
        if p.parent_version_id is not None:
            parent = model_version(ctx, p.parent_version_id)
            base_net, base_name = load_version(ctx, parent.id, {}).net, f"version:{parent.id}"
        else:
            base_row = ctx.session.scalar(select(BaseNetwork).where(BaseNetwork.name == p.base))
            if base_row is None:
                raise JobFailed(f"base model {p.base!r} is no longer registered")
            base_net = load_weights(ctx, base_row.weights_sha256, base_row.card or {}, base_row.source)
            base_name = base_row.name

    training_params = {
        "finetune": tp.model_dump(mode="json"),
        "self_train": st.model_dump(mode="json"),
        "markers": marker_origin,
        "foreground_channel": p.foreground_channel,
    }
    version = ctx.session.scalar(select(ModelVersion).where(ModelVersion.job_id == ctx.job_id))
    if version is None:
        version = _create_version(
            ctx,
            cell_line_id=ds.cell_line_id,
            reporter_id=reporter.id,
            object=p.object,
            status="training",
            base_model_id=base_row.id if base_row else None,
            parent_version_id=parent.id if parent else None,
            dataset_id=ds.id,
            job_id=ctx.job_id,
            training_params=training_params,
            pseudo_labelled=True,
        )
    else:
        version.status, version.training_curve, version.pseudo_labelled = "training", [], True
        ctx.session.commit()

    overrides = {k: getattr(tp, k) for k in ("learning_rate", "weight_decay") if getattr(tp, k) is not None}
    train_config = TrainingConfig(
        max_epochs=tp.max_epochs,
        min_epochs=min(tp.min_epochs, tp.max_epochs),
        patience=tp.patience,
        batch_size=tp.batch_size,
        bsize=tp.bsize,
        augment=tp.augment,
        microscopy_augment=tp.microscopy_augment,
        seed=tp.seed,
        min_train_masks=1,
        flow_cache_dir=str(ctx.settings.resolved_data_dir / "flow-cache"),
        normalize_per_image=not prenormalised,
        **overrides,
    )
    curve: list[dict[str, Any]] = []

    def on_epoch(report) -> None:
        curve.append(
            {
                "epoch": report.epoch,
                "train_loss": round(float(report.train_loss), 5),
                "val_loss": None if np.isnan(report.val_loss) else round(float(report.val_loss), 5),
                "elapsed_s": round(float(report.elapsed_s), 2),
            }
        )
        ctx.progress(
            f"fine-tuning on pseudo-labels: epoch {report.epoch} of at most {train_config.max_epochs}",
            0.4 + 0.5 * min(1.0, (report.epoch + 1) / train_config.max_epochs),
            summary={"training_curve": curve, "model_version_id": version.id},
            force=True,
        )

    try:
        with ctx.stage("fine-tuning on pseudo-labels", 0.4):
            result = finetune(
                base_net,
                [reporter_images[i] for i in train_idx],
                [pseudo.labels[i] for i in train_idx],
                [reporter_images[i] for i in val_idx],
                [pseudo.labels[i] for i in val_idx],
                train_config,
                on_epoch=on_epoch,
                should_stop=ctx.cancel_requested,
            )
    except TrainingCancelled:
        raise _cancelled(ctx, version) from None

    with ctx.stage("size model and scoring", 0.92):
        size_model = _fit_size_model(
            result, ([reporter_images[i] for i in train_idx], [pseudo.labels[i] for i in train_idx]), prenormalised
        )
        annotated = [
            (i, read_mask(ctx, mask_sha(row, p.object))) for i, row in enumerate(rows) if mask_sha(row, p.object)
        ]
        metrics: dict[str, Any] = {}
        if annotated:  # annotations were never read before this point
            metrics = _score_single(
                result.net,
                [reporter_images[i] for i, _ in annotated],
                [m for _, m in annotated],
                result.diameter,
                prenormalised,
            )
            metrics["against"] = "the dataset's annotations (unused in training)"

    with ctx.stage("saving", 0.97):
        card = weights.ModelCard(
            name=f"{ds.cell_line.name}-{p.reporter}-{p.object}",
            version=str(version.version),
            architecture=weights.architecture_of(result.net),
            diameter=float(result.diameter),
            reporter=p.reporter,
            cell_line=ds.cell_line.name,
            object=p.object,
            training={
                **train_config.to_dict(),
                "best_epoch": result.best_epoch,
                "stop_reason": result.stop_reason,
                "n_train": result.n_train,
                "n_val": result.n_val,
                "pseudo_labelled": True,
                "self_training": {
                    **config.to_dict(),
                    "diameter": pseudo.diameter,
                    "markers_per_image": [len(m) for m in pseudo.markers],
                    "objects_per_image": counts,
                    "method": "marker-controlled patch loss after Din & Yu, Sci. Rep. 2021",
                },
                "markers": marker_origin,
            },
            data={
                "dataset_id": ds.id,
                "channel_index": ds.channels.index(p.reporter),
                "preprocessing": preprocessing_record,
                "labels": "pseudo-labels from self-training (no human annotation)",
            },
            metrics={"annotated": metrics} if metrics else {},
            library_versions=library_versions(),
            parent=base_name,
            size_model=size_model,
            extra={"pseudo_labelled": True},
        )
        store_trained_version(ctx, version, result.net, card, curve, metrics, result.diameter)
        ctx.session.commit()
    return {
        "model_version_id": version.id,
        "version": version.version,
        "pseudo_labelled": True,
        "objects_per_image": counts,
        "markers": marker_origin,
        "best_epoch": result.best_epoch,
        "annotated_metrics": metrics,
        "diameter": result.diameter,
        "training_curve": curve,
    }
