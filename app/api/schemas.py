"""Request and response bodies. Strict where the client sends data: unknown fields are refused."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

JobStatusLiteral = Literal["queued", "running", "succeeded", "failed", "cancelled"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 ._+()/-]{0,119}$"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def as_utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; every timestamp CellFuse stores is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


class ResultOut(BaseModel):
    name: str
    kind: str
    media_type: str
    size_bytes: int
    sha256: str
    meta: dict[str, Any] = {}
    url: str


class JobOut(BaseModel):
    id: str
    kind: str
    status: JobStatusLiteral
    stage: str
    progress: float
    error: str | None
    params: dict[str, Any]
    summary: dict[str, Any]
    attempts: int
    max_attempts: int
    worker: str | None
    cancel_requested: bool
    stage_timings: dict[str, float]
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    results: list[ResultOut] = []

    @field_validator("created_at", "started_at", "heartbeat_at", "finished_at", mode="after")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return as_utc(value)


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class NoopJobIn(StrictModel):
    steps: int = Field(default=3, ge=1, le=1000)
    step_seconds: float = Field(default=0.2, ge=0, le=60)
    fail: bool = False


class HealthOut(BaseModel):
    status: Literal["ok"]


class ReadyOut(BaseModel):
    status: Literal["ready", "not ready"]
    checks: dict[str, Any]
    versions: dict[str, str | None]
