"""In-silico-labelling pretraining (Bonte et al., 2024): a new base model from paired images, no masks.

Each image of the dataset gives one (source channel -> target stain) pair per source channel. The
validation images are the dataset's 'val' split when it has one, else a seeded share. The result is a
``base_models`` row (source "isl") whose card carries the pretext loss and the validation correlation;
fine-tune jobs accept it by name as their base. A re-run of the job replaces the row it made.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from sqlalchemy import select

from app.job_params import PretrainISLJob
from app.models import BaseNetwork, Dataset
from workers.pipelines.common import library_versions, load_weights, read_field
from workers.runner import JobContext, JobFailed


def run(ctx: JobContext) -> dict[str, Any]:
    from app.science import weights
    from app.science.backbone import FULL_WIDTHS, HALF_WIDTHS
    from app.science.classical import estimate_diameter
    from app.science.isl import TARGET_LOGIT_SCALE, ISLConfig, pretrain_isl
    from app.science.training import TrainingCancelled

    p = ctx.params_as(PretrainISLJob)
    tp = p.params
    ds = ctx.session.get(Dataset, p.dataset_id)
    if ds is None:
        raise JobFailed(f"dataset {p.dataset_id} no longer exists")
    missing = [c for c in [*p.source_channels, p.target_channel] if c not in ds.channels]
    if missing:
        raise JobFailed(f"dataset {ds.id} no longer has channel(s) {', '.join(missing)}")
    sources_idx = [ds.channels.index(c) for c in p.source_channels]
    target_idx = ds.channels.index(p.target_channel)
    existing = ctx.session.scalar(select(BaseNetwork).where(BaseNetwork.name == p.name))
    if existing is not None and (existing.card or {}).get("training", {}).get("job_id") != ctx.job_id:
        raise JobFailed(f"a base model named {p.name!r} was registered meanwhile; submit again with another name")

    with ctx.stage("loading images", 0.01):
        rows = sorted(ds.images, key=lambda im: im.id)
        fields = []
        for row in rows:
            fields.append(read_field(ctx, row.image_sha256))
            ctx.progress()
        val_rows = [i for i, row in enumerate(rows) if row.split == "val"]
        if not val_rows and tp.val_fraction > 0:
            order = np.random.default_rng(tp.seed).permutation(len(rows))
            val_rows = sorted(int(i) for i in order[: max(1, round(len(rows) * tp.val_fraction))])
        train_rows = [i for i in range(len(rows)) if i not in set(val_rows)]
        if not train_rows:
            raise JobFailed("no training images left after the validation split")

        def pairs(indices: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
            return (
                [fields[i][sources_idx].astype(np.float32) for i in indices],
                [fields[i][target_idx].astype(np.float32) for i in indices],
            )

        train, val = pairs(train_rows), pairs(val_rows)
        diameter = tp.diameter or float(np.median([estimate_diameter(t) for t in train[1]]))

    init_net, init_name = None, None
    if p.init_base:
        with ctx.stage("loading the initial base model", 0.03):
            row = ctx.session.scalar(select(BaseNetwork).where(BaseNetwork.name == p.init_base))
            if row is None:
                raise JobFailed(f"base model {p.init_base!r} is no longer registered")
            init_net, init_name = load_weights(ctx, row.weights_sha256, row.card or {}, row.source), row.name

    config = ISLConfig(
        learning_rate=tp.learning_rate,
        batch_size=tp.batch_size,
        bsize=tp.bsize,
        max_epochs=tp.max_epochs,
        min_epochs=min(tp.min_epochs, tp.max_epochs),
        patience=tp.patience,
        crops_per_pair=tp.crops_per_pair,
        seed=tp.seed,
    )
    curve: list[dict[str, Any]] = []

    def number(value: float) -> float | None:
        return None if math.isnan(value) else round(float(value), 5)

    def on_epoch(report) -> None:
        curve.append(
            {
                "epoch": report.epoch,
                "train_loss": number(report.train_loss),
                "val_loss": number(report.val_loss),
                "val_correlation": number(report.val_correlation),
                "elapsed_s": round(report.elapsed_s, 2),
            }
        )
        ctx.progress(
            f"ISL pretext: epoch {report.epoch} of at most {config.max_epochs}",
            0.05 + 0.85 * min(1.0, (report.epoch + 1) / config.max_epochs),
            summary={"training_curve": curve},
            force=True,
        )

    try:
        with ctx.stage("training", 0.05):
            result = pretrain_isl(
                *train,
                *val,
                config,
                init_net=init_net,
                widths=FULL_WIDTHS if tp.widths == "full" else HALF_WIDTHS,
                diameter=diameter,
                on_epoch=on_epoch,
                should_stop=ctx.cancel_requested,
            )
    except TrainingCancelled:
        from app.jobs import JobCancelled

        raise JobCancelled(ctx.job_id) from None

    with ctx.stage("saving", 0.95):
        metrics = {"pretext_val_l1": number(result.best_val_loss), "val_correlation": number(result.val_correlation)}
        card = weights.ModelCard(
            name=p.name,
            version="1",
            architecture=weights.architecture_of(result.net),
            diameter=float(diameter),
            reporter="any (ISL-pretrained)",
            object="nuclei",
            training={
                **config.to_dict(),
                "pretext": "in-silico labelling",
                "job_id": ctx.job_id,
                "loss": "L1 on the cell-probability output map",
                "target_scale": TARGET_LOGIT_SCALE,
                "best_epoch": result.best_epoch,
                "stop_reason": result.stop_reason,
                "epochs_run": len(result.history),
                "n_train_pairs": result.n_train,
                "n_val_pairs": result.n_val,
                "from": init_name or "random initialisation",
                "method": "Bonte et al. 2024, in-silico labelling pretraining",
            },
            data={
                "dataset_id": ds.id,
                "source_channels": p.source_channels,
                "target_channel": p.target_channel,
                "train_images": [rows[i].id for i in train_rows],
                "val_images": [rows[i].id for i in val_rows],
            },
            metrics=metrics,
            library_versions=library_versions(),
            parent=init_name,
        )
        saved = weights.save_model(result.net, card, ctx.folder.path / "model", "model")
        blob = ctx.blobs.put_bytes(saved.weights_path.read_bytes())
        ctx.add_result(
            "model/card.json", saved.card_path.read_bytes(), kind="model_card", media_type="application/json"
        )
        ctx.add_result(
            "training_curve.json", json.dumps(curve).encode(), kind="training_curve", media_type="application/json"
        )
        card_dict = {**saved.card.to_dict(), "training_curve": curve}
        if existing is None:
            existing = BaseNetwork(name=p.name, source="isl", weights_sha256=blob.sha256, card=card_dict)
            ctx.session.add(existing)
        else:
            existing.weights_sha256, existing.card = blob.sha256, card_dict
        ctx.session.commit()
    return {
        "base_model_id": existing.id,
        "name": p.name,
        "best_epoch": result.best_epoch,
        "stop_reason": result.stop_reason,
        "metrics": metrics,
        "diameter": diameter,
        "training_curve": curve,
    }
