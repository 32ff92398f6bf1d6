"""Webhook subscriptions of a LIMS, their secrets, and the record of every delivery attempt."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from app import webhooks
from app.api.deps import IdPath, InstrumentDep, SessionDep, SettingsDep
from app.api.errors import Problem
from app.models import WebhookDelivery, WebhookSubscription
from app.security import Principal

router = APIRouter(prefix="/api/v1/webhooks", tags=["webhooks"])

EventLiteral = Literal["job.succeeded", "job.failed", "job.cancelled", "plate.field_failed", "plate.qc_flagged"]


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=8, max_length=2000, description="http(s) URL of the receiver")
    events: list[EventLiteral] = Field(
        default_factory=list, max_length=10, description="event types to send; empty = all"
    )
    job_id: str | None = Field(default=None, max_length=36, description="only events of this job")
    plate: str | None = Field(default=None, max_length=120, description="only events of this plate")
    description: str | None = Field(default=None, max_length=500)


class WebhookOut(BaseModel):
    id: int
    url: str
    events: list[str]
    job_id: str | None
    plate: str | None
    description: str | None
    active: bool
    created_at: datetime


class WebhookCreated(WebhookOut):
    secret: str = Field(description="shown once: verify the CellFuse-Signature header with it")


class AttemptOut(BaseModel):
    number: int
    status_code: int | None
    error: str | None
    duration_ms: float
    at: datetime


class DeliveryOut(BaseModel):
    id: int
    event_id: str
    event_type: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None
    payload: dict
    attempt_log: list[AttemptOut]


def _out(row: WebhookSubscription) -> WebhookOut:
    return WebhookOut(
        id=row.id,
        url=row.url,
        events=row.events or [],
        job_id=row.job_id,
        plate=row.plate,
        description=row.description,
        active=row.active,
        created_at=row.created_at,
    )


def _visible(session, subscription_id: int, principal: Principal) -> WebhookSubscription:
    row = session.get(WebhookSubscription, subscription_id)
    if row is None or not row.active or (row.owner_key_id != principal.key_id and not principal.has_role("admin")):
        raise Problem(404, f"no webhook subscription {subscription_id}", slug="webhook-not-found")
    return row


@router.post(
    "",
    response_model=WebhookCreated,
    status_code=201,
    summary="Subscribe a URL to job and plate events; the answer holds its signing secret once",
)
def create_webhook(
    body: WebhookIn, session: SessionDep, settings: SettingsDep, principal: InstrumentDep, response: Response
) -> WebhookCreated:
    try:
        webhooks.resolve_target(body.url, allow_private=settings.webhook_allow_private)
    except webhooks.WebhookTargetError as exc:
        raise Problem(422, str(exc), slug="webhook-target-refused")
    row = WebhookSubscription(
        owner_key_id=principal.key_id,
        url=body.url,
        secret=webhooks.new_secret(),
        events=list(dict.fromkeys(body.events)),
        job_id=body.job_id,
        plate=body.plate,
        description=body.description,
        active=True,
    )
    session.add(row)
    session.commit()
    response.headers["Location"] = f"/api/v1/webhooks/{row.id}"
    return WebhookCreated(**_out(row).model_dump(), secret=row.secret)


@router.get("", response_model=list[WebhookOut], summary="Your webhook subscriptions (an admin sees all)")
def list_webhooks(session: SessionDep, principal: InstrumentDep) -> list[WebhookOut]:
    stmt = select(WebhookSubscription).where(WebhookSubscription.active.is_(True))
    if not principal.has_role("admin"):
        stmt = stmt.where(WebhookSubscription.owner_key_id == principal.key_id)
    return [_out(r) for r in session.scalars(stmt.order_by(WebhookSubscription.id))]


@router.get("/{subscription_id}", response_model=WebhookOut, summary="One webhook subscription")
def get_webhook(subscription_id: IdPath, session: SessionDep, principal: InstrumentDep) -> WebhookOut:
    return _out(_visible(session, subscription_id, principal))


@router.delete("/{subscription_id}", status_code=204, summary="Unsubscribe (pending deliveries stop)")
def delete_webhook(subscription_id: IdPath, session: SessionDep, principal: InstrumentDep) -> Response:
    row = _visible(session, subscription_id, principal)
    row.active = False
    for delivery in session.scalars(
        select(WebhookDelivery).where(WebhookDelivery.subscription_id == row.id, WebhookDelivery.status == "pending")
    ):
        delivery.status, delivery.last_error = "failed", "the subscription was deleted"
    session.commit()
    return Response(status_code=204)


@router.post(
    "/{subscription_id}/rotate-secret",
    response_model=WebhookCreated,
    summary="A new signing secret (the old one stops signing at once)",
)
def rotate_secret(subscription_id: IdPath, session: SessionDep, principal: InstrumentDep) -> WebhookCreated:
    row = _visible(session, subscription_id, principal)
    row.secret = webhooks.new_secret()
    session.commit()
    return WebhookCreated(**_out(row).model_dump(), secret=row.secret)


@router.post("/{subscription_id}/ping", status_code=202, summary="Queue a signed webhook.ping event")
def ping(subscription_id: IdPath, session: SessionDep, principal: InstrumentDep) -> dict:
    row = _visible(session, subscription_id, principal)
    webhooks.emit(session, "webhook.ping", {"subscription_id": row.id}, subscription=row)
    return {"queued": 1}


@router.get(
    "/{subscription_id}/deliveries",
    response_model=list[DeliveryOut],
    summary="Deliveries, newest first, with every attempt (status code, error, duration)",
)
def list_deliveries(
    subscription_id: IdPath,
    session: SessionDep,
    principal: InstrumentDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[DeliveryOut]:
    row = _visible(session, subscription_id, principal)
    rows = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.subscription_id == row.id)
        .order_by(WebhookDelivery.id.desc())
        .limit(limit)
    ).all()
    return [
        DeliveryOut(
            id=d.id,
            event_id=d.event_id,
            event_type=d.event_type,
            status=d.status,
            attempts=d.attempts,
            next_attempt_at=d.next_attempt_at if d.status == "pending" else None,
            last_status_code=d.last_status_code,
            last_error=d.last_error,
            created_at=d.created_at,
            finished_at=d.finished_at,
            payload=d.payload,
            attempt_log=[
                AttemptOut(
                    number=a.number, status_code=a.status_code, error=a.error, duration_ms=a.duration_ms, at=a.at
                )
                for a in d.attempt_log
            ],
        )
        for d in rows
    ]
