"""One settings object for the API, the workers and the CLI (environment prefix ``CELLFUSE_``).

Defaults are the *embedded* set-up: a SQLite file, a local blob folder and a Celery broker that needs
no server (kombu's SQLAlchemy transport on a second SQLite file), all under ``data_dir``. Production
points ``database_url`` at PostgreSQL and ``broker_url`` at Redis.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Secrets that appear in examples and templates; a deployment that keeps one is misconfigured.
PLACEHOLDER_SECRETS = frozenset(
    {"changeme", "changethis", "change-me", "secret", "password", "admin", "apikey", "api-key", "test"}
)
MIN_SECRET_LENGTH = 16


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CELLFUSE_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path("cellfuse-data")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite file under data_dir")
    broker_url: str | None = Field(
        default=None, description="Celery broker; default: kombu SQLAlchemy transport under data_dir"
    )
    # Keys are stored hashed in the database; this optional one bootstraps an admin key at start-up
    # (docker-compose passes it from a secret). Placeholders are refused.
    bootstrap_admin_key: SecretStr | None = None

    max_upload_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    # The whole request body (a plate upload carries one file per field); refused before it is read.
    max_request_bytes: int = Field(default=4 * 1024 * 1024 * 1024, gt=0)
    # Bodies received at once (upload slots) and their bytes; beyond: 503 (429 past one key's share).
    max_concurrent_uploads: int = Field(default=4, ge=1)
    max_uploads_per_key: int = Field(default=2, ge=1)
    max_upload_bytes_in_flight: int = Field(default=8 * 1024 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=64_000_000, gt=0, description="per plane: Y*X*channels")
    # /ready reports "not ready" when the data directory has less free space than this.
    min_free_disk_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    worker_queues: list[str] = Field(default_factory=lambda: ["gpu", "cpu"])
    worker_concurrency: int = Field(default=1, ge=1)
    # Where a worker's networks run: auto (the first GPU if any, else the CPU), cpu, cuda or cuda:N.
    # Resolved in each worker process after the fork (app.science.device), never in the parent.
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    # Autocast precision of inference and of fine-tuning (app.science.device): auto is fp32 for
    # inference (bf16's mask agreement depends on the model) and bf16 for training where native.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    training_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # Loaded networks kept per worker process (bytes of weights), least recently used out first.
    model_cache_bytes: int = Field(default=1 << 30, ge=0)
    # Fields per network batch when segmenting a plate (0: by device, 2 on a CPU, 8 on a GPU).
    plate_batch_fields: int = Field(default=0, ge=0)
    # "plate": fields batched and overlapped (app.science.plate); "per_field": one field after the
    # other, as before that engine (kept for `cellfuse bench plate` and as a fallback).
    segment_route: Literal["plate", "per_field"] = "plate"

    # Bounds per role on what one job may occupy a worker for: a noop's steps x seconds, and a
    # fine-tune's max_epochs (instrument keys cannot fine-tune at all).
    max_noop_seconds: dict[str, float] = Field(
        default_factory=lambda: {"instrument": 300.0, "scientist": 3600.0, "admin": 6 * 3600.0}
    )
    max_finetune_epochs: dict[str, int] = Field(default_factory=lambda: {"scientist": 1000, "admin": 5000})

    # A fine-tune saves its training state at most this often, so that a later attempt (after a lost
    # worker or a long database outage) resumes from the last saved epoch instead of epoch 0.
    checkpoint_interval_s: float = Field(default=60.0, ge=0)

    # A running job's worker writes a heartbeat this often; a job whose heartbeat is older than
    # job_stale_after_s is taken to have lost its worker and is re-run, up to job_max_attempts.
    job_heartbeat_s: float = Field(default=5.0, gt=0)
    job_stale_after_s: float = Field(default=60.0, gt=0)
    job_max_attempts: int = Field(default=3, ge=1)
    # A running job whose pipeline reaches no checkpoint (progress, epoch, field, channel) for this
    # long is stalled: its heartbeat stops and the reaper re-queues or fails it.
    job_stall_after_s: float = Field(default=1800.0, gt=0)
    # A job still queued this long after it was sent is sent again (a broker restart can lose it);
    # duplicates are harmless because a worker must claim the job in the database first.
    job_resend_after_s: float = Field(default=120.0, gt=0)
    # Temporary files of uploads and blob writes older than this are leftovers of a killed process.
    tmp_max_age_s: float = Field(default=30 * 60.0, gt=0)
    reaper_interval_s: float = Field(default=10.0, gt=0)
    ready_worker_timeout_s: float = Field(default=2.0, gt=0)

    # Webhooks to a LIMS. Private, loopback and link-local targets are refused (SSRF) unless an admin
    # allows them here (a LIMS on the lab network, or tests).
    webhook_allow_private: bool = False
    webhook_max_attempts: int = Field(default=8, ge=1, le=30)
    webhook_backoff_s: float = Field(default=10.0, gt=0, description="first retry delay; doubles each retry")
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_poll_s: float = Field(default=2.0, gt=0)

    # /metrics answers to an admin key, or to this bearer token (for a Prometheus scraper).
    metrics_token: SecretStr | None = None

    # Server-side OME-Zarr plates are read only below these folders (none = only uploaded plates).
    ome_zarr_roots: list[Path] = Field(default_factory=list)
    # A field with more pixels than this is segmented in overlapping blocks (memory budget per pass).
    segment_block_pixels: int = Field(default=4096 * 4096, gt=0)
    # What one blocked segmentation may hold: decides one reconstruction over stitched maps vs per block.
    segment_memory_budget_mb: int = Field(default=8192, gt=0)

    @field_validator("bootstrap_admin_key")
    @classmethod
    def _refuse_placeholder(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        secret = value.get_secret_value()
        if secret.lower() in PLACEHOLDER_SECRETS or len(secret) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"CELLFUSE_BOOTSTRAP_ADMIN_KEY is a placeholder or shorter than {MIN_SECRET_LENGTH} "
                "characters; generate one with `cellfuse keys generate`"
            )
        return value

    @model_validator(mode="after")
    def _production_needs_servers(self) -> "Settings":
        if self.environment == "production" and (self.database_url is None or self.broker_url is None):
            raise ValueError("production needs CELLFUSE_DATABASE_URL and CELLFUSE_BROKER_URL set explicitly")
        return self

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'cellfuse.sqlite'}"

    @property
    def resolved_broker_url(self) -> str:
        # kombu's SQLAlchemy transport: transactional, works across processes, survives a crash of
        # either side (the filesystem transport also works but loses messages on a partial write).
        return self.broker_url or f"sqla+sqlite:///{self.resolved_data_dir / 'broker.sqlite'}"

    @property
    def blob_dir(self) -> Path:
        return self.resolved_data_dir / "blobs"

    @property
    def jobs_dir(self) -> Path:
        return self.resolved_data_dir / "jobs"

    @property
    def is_embedded_broker(self) -> bool:
        return self.resolved_broker_url.startswith(("sqla+", "filesystem:"))


@lru_cache
def get_settings() -> Settings:
    return Settings()
