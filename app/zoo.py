"""The model zoo's rules, independent of HTTP: lookups, versions, aliases, resolution.

Errors are :class:`ZooError` subclasses carrying the HTTP status the API should answer with and a
message a lab person can act on.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import (
    OBJECTS,
    AliasMove,
    BaseNetwork,
    CellLine,
    ChannelSet,
    Dataset,
    Evaluation,
    ModelAlias,
    ModelVersion,
    Reporter,
    utcnow,
)
from app.storage import BlobStore
from app.vocabulary import DEFAULT_ALIAS

log = logging.getLogger(__name__)

#: The metric an alias move is judged by.
ALIAS_METRIC = "f1"


class ZooError(ValueError):
    status = 400
    slug = "zoo-error"


class NotFound(ZooError):
    status = 404
    slug = "not-found"


class Conflict(ZooError):
    status = 409
    slug = "conflict"


class Unprocessable(ZooError):
    status = 422
    slug = "unprocessable"


def check_object(obj: str) -> str:
    if obj not in OBJECTS:
        raise Unprocessable(f"object must be one of {', '.join(OBJECTS)}, not {obj!r}")
    return obj


def cell_line_by_name(session: Session, name: str) -> CellLine:
    row = session.scalar(select(CellLine).where(CellLine.name == name))
    if row is None:
        raise NotFound(f"no cell line named {name!r}; register it first (POST /api/v1/cell-lines)")
    return row


def reporter_by_name(session: Session, name: str) -> Reporter:
    row = session.scalar(select(Reporter).where(Reporter.name == name))
    if row is None:
        raise NotFound(f"no reporter named {name!r}; register it first (POST /api/v1/reporters)")
    return row


def base_model_by_name(session: Session, name: str) -> BaseNetwork:
    row = session.scalar(select(BaseNetwork).where(BaseNetwork.name == name))
    if row is None:
        names = ", ".join(session.scalars(select(BaseNetwork.name)).all()) or "none registered"
        raise NotFound(f"no base model named {name!r} (available: {names})")
    return row


def dataset_by_id(session: Session, dataset_id: int) -> Dataset:
    row = session.get(Dataset, dataset_id)
    if row is None:
        raise NotFound(f"no dataset with id {dataset_id}")
    return row


def model_version_by_id(session: Session, version_id: int) -> ModelVersion:
    row = session.get(ModelVersion, version_id)
    if row is None:
        raise NotFound(f"no model version with id {version_id}")
    return row


def next_version_number(session: Session, cell_line_id: int, reporter_id: int, obj: str) -> int:
    current = session.scalar(
        select(func.max(ModelVersion.version)).where(
            ModelVersion.cell_line_id == cell_line_id,
            ModelVersion.reporter_id == reporter_id,
            ModelVersion.object == obj,
        )
    )
    return (current or 0) + 1


def register_base_models(session: Session, blobs: BlobStore) -> list[str]:
    """Make the shipped base and any local Cellpose weights available to fine-tune from."""
    from models_zoo.registry import cellpose_local_models, shipped_base_models, verify

    added = []
    for entry in [*shipped_base_models(), *cellpose_local_models()]:
        if session.scalar(select(BaseNetwork).where(BaseNetwork.name == entry.name)) is not None:
            continue
        try:
            verify(entry.weights_path, entry.weights_sha256)
        except (FileNotFoundError, ValueError) as exc:
            log.warning("base model %s not registered: %s", entry.name, exc)
            continue
        if not blobs.exists(entry.weights_sha256):
            target = blobs.path_for(entry.weights_sha256)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".partial")
            shutil.copyfile(entry.weights_path, tmp)
            tmp.replace(target)
        session.add(
            BaseNetwork(name=entry.name, source=entry.source, weights_sha256=entry.weights_sha256, card=entry.card)
        )
        added.append(entry.name)
    session.commit()
    return added


def latest_ready_version(session: Session, cell_line_id: int, reporter_id: int, obj: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion)
        .where(
            ModelVersion.cell_line_id == cell_line_id,
            ModelVersion.reporter_id == reporter_id,
            ModelVersion.object == obj,
            ModelVersion.status == "ready",
        )
        .order_by(ModelVersion.version.desc())
        .limit(1)
    )


def alias_row(session: Session, cell_line_id: int, reporter_id: int, obj: str, alias: str) -> ModelAlias | None:
    return session.scalar(
        select(ModelAlias).where(
            ModelAlias.cell_line_id == cell_line_id,
            ModelAlias.reporter_id == reporter_id,
            ModelAlias.object == obj,
            ModelAlias.alias == alias,
        )
    )


@dataclass(frozen=True)
class Resolution:
    models: dict[str, ModelVersion]  # reporter name -> version
    missing: list[str]  # reporters with no usable model
    how: dict[str, str]  # reporter name -> "alias production" | "latest ready"


class UnknownAlias(Unprocessable):
    slug = "unknown-alias"


def known_aliases(session: Session, cell_line_id: int) -> list[str]:
    """Aliases that name at least one model of this cell line."""
    return sorted(set(session.scalars(select(ModelAlias.alias).where(ModelAlias.cell_line_id == cell_line_id))))


def check_alias(session: Session, cell_line: CellLine, alias: str) -> str:
    """A request's alias must exist for the cell line; only the default may name no model yet (then
    each reporter's newest ready version is used). A misspelt alias never silently becomes "latest"."""
    existing = known_aliases(session, cell_line.id)
    if alias != DEFAULT_ALIAS and alias not in existing:
        listing = ", ".join(repr(a) for a in existing) if existing else f"none yet (the default {DEFAULT_ALIAS!r})"
        raise UnknownAlias(f"cell line {cell_line.name!r} has no alias {alias!r}; its aliases: {listing}")
    return alias


def resolve_models(
    session: Session, cell_line: CellLine, reporters: list[str], obj: str, alias: str = DEFAULT_ALIAS
) -> Resolution:
    """The model version per reporter: the alias holder, else the newest ready version."""
    models, missing, how = {}, [], {}
    for name in reporters:
        reporter = session.scalar(select(Reporter).where(Reporter.name == name))
        if reporter is None:
            missing.append(name)
            continue
        held = alias_row(session, cell_line.id, reporter.id, obj, alias)
        if held is not None and held.model_version.status == "ready":
            models[name], how[name] = held.model_version, f"alias {alias}"
            continue
        latest = latest_ready_version(session, cell_line.id, reporter.id, obj)
        if latest is None:
            missing.append(name)
        else:
            models[name], how[name] = latest, "latest ready"
    return Resolution(models, missing, how)


def chosen_channels(session: Session, cell_line_id: int, obj: str) -> ChannelSet | None:
    return session.scalar(
        select(ChannelSet)
        .where(ChannelSet.cell_line_id == cell_line_id, ChannelSet.object == obj)
        .order_by(ChannelSet.created_at.desc(), ChannelSet.id.desc())
        .limit(1)
    )


def _comparable_scores(session: Session, candidate: ModelVersion, holder: ModelVersion) -> tuple[float, float] | None:
    """Both versions' F1 on the same test set (same pixels and masks), newest evaluation each, or None."""

    def by_set(version_id: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for ev in session.scalars(
            select(Evaluation).where(Evaluation.model_version_id == version_id).order_by(Evaluation.created_at)
        ).all():
            if ALIAS_METRIC in (ev.metrics or {}):
                out[ev.test_set_sha256] = float(ev.metrics[ALIAS_METRIC])
        return out

    cand, held = by_set(candidate.id), by_set(holder.id)
    common = sorted(set(cand) & set(held))
    if not common:
        return None
    return cand[common[-1]], held[common[-1]]


def move_alias(
    session: Session,
    cell_line: CellLine,
    reporter: Reporter,
    obj: str,
    alias: str,
    version: ModelVersion,
    *,
    force: bool,
    reason: str | None,
    actor_key_id: int | None,
) -> ModelAlias:
    """Point ``alias`` at ``version``; refuse a worse model (on the same test set) unless forced."""
    if (version.cell_line_id, version.reporter_id, version.object) != (cell_line.id, reporter.id, obj):
        raise Unprocessable(f"model version {version.id} belongs to another (cell line, reporter, object)")
    if version.status != "ready":
        raise Conflict(f"model version {version.id} is {version.status}; only ready versions can hold an alias")
    row = alias_row(session, cell_line.id, reporter.id, obj, alias)
    previous = row.model_version if row is not None else None
    if previous is not None and previous.id != version.id and not force:
        scores = _comparable_scores(session, version, previous)
        if scores is None:
            raise Conflict(
                f"version {version.id} and the current '{alias}' holder (version {previous.id}) have no "
                "evaluation on a common test set; run an evaluate job for both, or move with force=true"
            )
        new_f1, old_f1 = scores
        if new_f1 < old_f1:
            raise Conflict(
                f"version {version.id} has test F1 {new_f1:.3f}, worse than the current '{alias}' holder "
                f"(version {previous.id}, F1 {old_f1:.3f}) on the same test set; use force=true to move anyway"
            )
    if row is None:
        row = ModelAlias(
            cell_line_id=cell_line.id, reporter_id=reporter.id, object=obj, alias=alias, model_version_id=version.id
        )
        session.add(row)
    else:
        row.model_version_id = version.id
        row.updated_at = utcnow()
    session.flush()
    session.add(
        AliasMove(
            alias_id=row.id,
            from_version_id=previous.id if previous else None,
            to_version_id=version.id,
            forced=force,
            reason=reason,
            actor_key_id=actor_key_id,
        )
    )
    session.commit()
    session.refresh(row)
    return row


def fitted_fusion(
    session: Session, cell_line_id: int, obj: str, models: dict[str, int]
) -> tuple[dict[str, Any] | None, str | None]:
    """The newest fusion parameters fitted for exactly these channels with exactly these model
    versions (a re-trained model makes the fitted weights stale: then none), and where they came from."""
    rows = session.scalars(
        select(ChannelSet)
        .where(
            ChannelSet.cell_line_id == cell_line_id, ChannelSet.object == obj, ChannelSet.fusion_parameters.is_not(None)
        )
        .order_by(ChannelSet.created_at.desc(), ChannelSet.id.desc())
    )
    for row in rows:
        record = row.fusion_parameters or {}
        fitted_models = {str(k): int(v) for k, v in (record.get("models") or {}).items()}
        if sorted(record.get("channels", [])) == sorted(models) and fitted_models == dict(models):
            return record, f"channel set {row.id} (select-channels job {row.job_id})"
    return None, None
