"""Database tables (SQLAlchemy 2, typed ``Mapped`` columns).

The zoo is keyed by (cell line, reporter, object). Model versions are immutable once ``ready``;
aliases point at versions and every move is recorded. Jobs hold their own state (the result backend
of Celery is not used).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base
from app.vocabulary import OBJECTS  # noqa: F401  (re-exported: the database layer checks objects)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_uuid() -> str:
    return str(uuid.uuid4())


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(120))
    # The first characters of the key, shown in listings so a person can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class CellLine(Base):
    __tablename__ = "cell_lines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    species: Mapped[str | None] = mapped_column(String(120), nullable=True)
    tissue: Mapped[str | None] = mapped_column(String(120), nullable=True)
    notes: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Reporter(Base):
    __tablename__ = "reporters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    fluorophore: Mapped[str | None] = mapped_column(String(120), nullable=True)
    protein: Mapped[str | None] = mapped_column(String(120), nullable=True)
    localisation: Mapped[str | None] = mapped_column(String(120), nullable=True)
    notes: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    cell_line_id: Mapped[int] = mapped_column(ForeignKey("cell_lines.id"))
    # Reporter name per channel index of every image in the dataset.
    channels: Mapped[list[str]] = mapped_column(JSON)
    acquisition: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    notes: Mapped[str | None] = mapped_column(Text, nullable=True)
    owner_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    cell_line: Mapped[CellLine] = relationship()
    images: Mapped[list[DatasetImage]] = relationship(
        back_populates="dataset", order_by="DatasetImage.id", cascade="all, delete-orphan"
    )


class DatasetImage(Base):
    __tablename__ = "dataset_images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    image_sha256: Mapped[str] = mapped_column(String(64))
    # The uploaded file name, for display only: it is never used as a path.
    filename: Mapped[str] = mapped_column(String(255))
    height: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    n_channels: Mapped[int] = mapped_column(Integer)
    nuclei_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cells_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    plate: Mapped[str | None] = mapped_column(String(120), nullable=True)
    well: Mapped[str | None] = mapped_column(String(16), nullable=True)
    field: Mapped[int | None] = mapped_column(Integer, nullable=True)
    split: Mapped[str | None] = mapped_column(String(10), nullable=True)  # train | val | test

    dataset: Mapped[Dataset] = relationship(back_populates="images")


class BaseNetwork(Base):
    """A model fine-tuning can start from: the shipped base, a Cellpose file, an admin upload."""

    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    source: Mapped[str] = mapped_column(String(20))  # shipped | cellpose | upload
    weights_sha256: Mapped[str] = mapped_column(String(64))
    card: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("cell_line_id", "reporter_id", "object", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cell_line_id: Mapped[int] = mapped_column(ForeignKey("cell_lines.id"), index=True)
    reporter_id: Mapped[int] = mapped_column(ForeignKey("reporters.id"), index=True)
    object: Mapped[str] = mapped_column(String(10))
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(12), default="training")  # training|ready|failed|archived
    base_model_id: Mapped[int | None] = mapped_column(ForeignKey("base_models.id"), nullable=True)
    parent_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    training_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    weights_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    card: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    diameter: Mapped[float | None] = mapped_column(Float, nullable=True)
    test_metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    training_curve: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    #: Trained on masks a self-training job made (no human annotation): shown as such everywhere.
    pseudo_labelled: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    cell_line: Mapped[CellLine] = relationship()
    reporter: Mapped[Reporter] = relationship()


class ModelAlias(Base):
    __tablename__ = "model_aliases"
    __table_args__ = (UniqueConstraint("cell_line_id", "reporter_id", "object", "alias"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cell_line_id: Mapped[int] = mapped_column(ForeignKey("cell_lines.id"))
    reporter_id: Mapped[int] = mapped_column(ForeignKey("reporters.id"))
    object: Mapped[str] = mapped_column(String(10))
    alias: Mapped[str] = mapped_column(String(60))
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    model_version: Mapped[ModelVersion] = relationship()


class AliasMove(Base):
    """The audit trail of alias moves (who, from, to, forced, why)."""

    __tablename__ = "alias_moves"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alias_id: Mapped[int] = mapped_column(ForeignKey("model_aliases.id"), index=True)
    from_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    to_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    actor_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ChannelSet(Base):
    """The ranking of channel subsets for a (cell line, object), and the chosen one."""

    __tablename__ = "channel_sets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cell_line_id: Mapped[int] = mapped_column(ForeignKey("cell_lines.id"), index=True)
    object: Mapped[str] = mapped_column(String(10))
    method: Mapped[str] = mapped_column(String(30))
    ranking: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    chosen: Mapped[list[str]] = mapped_column(JSON)
    #: Flow Fusion parameters fitted for ``chosen`` on the validation fields (weights, thresholds,
    #: confidence mode, CV F1 and interval); None: equal weights and the fixed fused thresholds.
    fusion_parameters: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_key_id", "idempotency_key"),
        Index("ix_jobs_status_heartbeat", "status", "heartbeat_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_uuid)
    kind: Mapped[str] = mapped_column(String(30), index=True)
    status: Mapped[str] = mapped_column(String(12), default="queued", index=True)
    stage: Mapped[str] = mapped_column(String(200), default="queued")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True)
    owner_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    stage_timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    results: Mapped[list[JobResult]] = relationship(
        back_populates="job", order_by="JobResult.id", cascade="all, delete-orphan"
    )


class JobResult(Base):
    """A downloadable file a job produced (a mask, a table, a preview ...), content-addressed."""

    __tablename__ = "job_results"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    # Stable, path-safe name within the job, e.g. "A01-1/nuclei.tif".
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(40))
    media_type: Mapped[str] = mapped_column(String(100))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    job: Mapped[Job] = relationship(back_populates="results")


class WorkerHeartbeat(Base):
    """Each worker process says it is alive here (transport-independent, unlike Celery's pings)."""

    __tablename__ = "worker_heartbeats"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    queues: Mapped[list[str]] = mapped_column(JSON, default=list)
    info: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Evaluation(Base):
    """Metrics of a model version, or of a fusion setting, on one split of a labelled dataset."""

    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True, index=True)
    # For fusion evaluations: {"cell_line": ..., "object": ..., "channels": [...], "method": ...}
    fusion: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id"))
    split: Mapped[str] = mapped_column(String(10))
    # sha256 over the image and mask hashes of the split: "the same test set" means the same bytes.
    test_set_sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookSubscription(Base):
    """A LIMS endpoint told about job and plate events, signed with this subscription's own secret.

    The secret is stored as given (not hashed): the server must be able to sign with it, as Stripe
    and Svix do. It is shown once at creation and on rotation, never in listings.
    """

    __tablename__ = "webhook_subscriptions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    url: Mapped[str] = mapped_column(String(2000))
    secret: Mapped[str] = mapped_column(String(200))
    # Event types ("job.succeeded", ...); empty = every event.
    events: Mapped[list[str]] = mapped_column(JSON, default=list)
    # Optional scope: only events of this job, or of this plate.
    job_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    plate: Mapped[str | None] = mapped_column(String(120), nullable=True)
    description: Mapped[str | None] = mapped_column(String(500), nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebhookDelivery(Base):
    """One event for one subscription; retried with exponential back-off until delivered or given up."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_status_next", "status", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    subscription_id: Mapped[int] = mapped_column(ForeignKey("webhook_subscriptions.id", ondelete="CASCADE"), index=True)
    event_id: Mapped[str] = mapped_column(String(36), default=new_uuid)
    event_type: Mapped[str] = mapped_column(String(60))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(12), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    attempt_log: Mapped[list[WebhookAttempt]] = relationship(
        back_populates="delivery", order_by="WebhookAttempt.id", cascade="all, delete-orphan"
    )


class WebhookAttempt(Base):
    """Every HTTP attempt of a delivery: what the receiver answered, or why it could not."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration_ms: Mapped[float] = mapped_column(Float)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    delivery: Mapped[WebhookDelivery] = relationship(back_populates="attempt_log")


class IlluminationProfile(Base):
    """A per-channel flatfield (and darkfield) as a versioned artefact: estimated with BaSiC from a
    plate or dataset (``source='estimated'``, with the job and the inputs it saw) or uploaded
    (``source='uploaded'``). The arrays are a float32 TIFF blob ``(1 or 2, C, Y, X)``."""

    __tablename__ = "illumination_profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(20))
    method: Mapped[str] = mapped_column(String(20))
    channels: Mapped[list[str]] = mapped_column(JSON)
    height: Mapped[int] = mapped_column(Integer)
    width: Mapped[int] = mapped_column(Integer)
    has_darkfield: Mapped[bool] = mapped_column(Boolean, default=False)
    blob_sha256: Mapped[str] = mapped_column(String(64))
    #: What it was estimated from: field count and the fields' image sha256s (or the upload's name).
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"), nullable=True)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
