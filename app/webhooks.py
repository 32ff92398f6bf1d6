"""Signed webhooks to a LIMS: subscriptions, events, deliveries with retries, and the SSRF guard.

An event becomes one ``WebhookDelivery`` row per matching subscription, in the same database as the
jobs, so an event written by a worker is never lost when the API restarts. A dispatcher (a thread of
every API process, ``webhook_loop``) posts due deliveries, records every attempt and retries
with exponential back-off; deliveries are claimed with a conditional UPDATE, so several API
processes never send the same attempt twice.

Signature (Stripe / Standard Webhooks style): ``CellFuse-Signature: v1=<hex>``, where ``<hex>`` is
HMAC-SHA256 with the subscription's secret over ``f"{timestamp}.{body}"`` and ``timestamp`` is the
``CellFuse-Timestamp`` header (Unix seconds). A receiver recomputes it over the raw body, compares in
constant time and refuses timestamps older than a few minutes (replays).

SSRF: a target's host is resolved and *every* address must be public (not loopback, private,
link-local, multicast, reserved, unspecified); this is checked when the subscription is made and again
at each delivery, and the request then goes to the address just checked (the Host header and TLS
SNI keep the name), so a DNS answer that changes between check and connect (rebinding) cannot
redirect it. Redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.models import ApiKey, WebhookAttempt, WebhookDelivery, WebhookSubscription, utcnow

log = logging.getLogger(__name__)

EVENT_TYPES = ("job.succeeded", "job.failed", "job.cancelled", "plate.field_failed", "plate.qc_flagged", "webhook.ping")
SIGNATURE_HEADER = "CellFuse-Signature"
TIMESTAMP_HEADER = "CellFuse-Timestamp"
EVENT_ID_HEADER = "CellFuse-Event-Id"
EVENT_TYPE_HEADER = "CellFuse-Event"
SECRET_PREFIX = "whsec_"
#: Roles whose subscriptions see every job's events (they can read every job over the API too).
SEE_ALL_ROLES = ("scientist", "admin")
#: A claimed delivery is not picked by another dispatcher for this long (a crashed sender frees it).
CLAIM_LEASE_S = 120.0


class WebhookTargetError(ValueError):
    """The URL cannot be a webhook target (scheme, host, or a private address)."""


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def sign(secret: str, timestamp: int | str, body: bytes) -> str:
    message = f"{timestamp}.".encode() + body
    return "v1=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify_signature(
    secret: str,
    timestamp: str,
    signature_header: str,
    body: bytes,
    *,
    tolerance_s: float = 300.0,
    now: float | None = None,
) -> bool:
    """What a receiver does: constant-time compare of any ``v1=`` signature, and a fresh timestamp."""
    try:
        sent_at = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - sent_at) > tolerance_s:
        return False
    expected = sign(secret, sent_at, body)
    return any(hmac.compare_digest(expected, part.strip()) for part in signature_header.split(","))


# ---------------------------------------------------------------------------------------------
# Target checks (SSRF)


def _address_is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (
        ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


def check_url_shape(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookTargetError("a webhook URL must start with http:// or https://")
    if not parts.hostname:
        raise WebhookTargetError("the webhook URL has no host")
    if parts.username or parts.password:
        raise WebhookTargetError("put no credentials in the webhook URL; the signature authenticates CellFuse")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise WebhookTargetError(f"the webhook URL has a bad port: {exc}") from exc
    return parts.scheme, parts.hostname, port


def resolve_target(
    url: str, *, allow_private: bool, resolver: Callable[[str, int], list[str]] | None = None
) -> list[str]:
    """The addresses to connect to; refuses if any address is not public (unless allowed)."""
    _scheme, host, port = check_url_shape(url)
    try:
        if resolver is not None:
            addresses = resolver(host, port)
        else:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = list(dict.fromkeys(info[4][0] for info in infos))  # type: ignore[misc]
    except (OSError, UnicodeError) as exc:
        raise WebhookTargetError(f"the webhook host {host!r} does not resolve: {exc}") from exc
    if not addresses:
        raise WebhookTargetError(f"the webhook host {host!r} has no address")
    if not allow_private:
        blocked = [a for a in addresses if not _address_is_public(a)]
        if blocked:
            raise WebhookTargetError(
                f"the webhook host {host!r} resolves to a loopback, private or link-local address "
                f"({', '.join(blocked)}); an admin can allow such targets with CELLFUSE_WEBHOOK_ALLOW_PRIVATE=true"
            )
    return addresses


# ---------------------------------------------------------------------------------------------
# Events


def _subscriptions_for(
    session: Session, event_type: str, owner_key_id: int | None, job_id: str | None, plate: str | None
) -> list[WebhookSubscription]:
    stmt = (
        select(WebhookSubscription)
        .outerjoin(ApiKey, ApiKey.id == WebhookSubscription.owner_key_id)
        .where(
            WebhookSubscription.active.is_(True),
            ApiKey.revoked_at.is_(None),
            or_(WebhookSubscription.owner_key_id == owner_key_id, ApiKey.role.in_(SEE_ALL_ROLES)),
            or_(WebhookSubscription.job_id.is_(None), WebhookSubscription.job_id == job_id),
            or_(WebhookSubscription.plate.is_(None), WebhookSubscription.plate == plate),
        )
    )
    return [s for s in session.scalars(stmt).all() if not s.events or event_type in s.events]


def emit(
    session: Session,
    event_type: str,
    data: dict[str, Any],
    *,
    owner_key_id: int | None = None,
    job_id: str | None = None,
    plate: str | None = None,
    subscription: WebhookSubscription | None = None,
) -> int:
    """Queue ``event_type`` for every matching subscription (or just ``subscription``); commits."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event {event_type!r}")
    targets = (
        [subscription]
        if subscription is not None
        else _subscriptions_for(session, event_type, owner_key_id, job_id, plate)
    )
    for sub in targets:
        delivery = WebhookDelivery(
            subscription_id=sub.id,
            event_type=event_type,
            payload={},
            status="pending",
            attempts=0,
            next_attempt_at=utcnow(),
        )
        session.add(delivery)
        session.flush()  # the event id is the row's, so a retry carries the same id (receivers dedupe on it)
        delivery.payload = {
            "id": delivery.event_id,
            "type": event_type,
            "created_at": utcnow().isoformat(timespec="seconds"),
            "data": data,
        }
    session.commit()
    return len(targets)


def emit_safely(session: Session, event_type: str, data: dict[str, Any], **scope: Any) -> None:
    """Events must never break the job they report on: a failure to queue one is logged."""
    try:
        emit(session, event_type, data, **scope)
    except Exception:
        session.rollback()
        log.warning("could not queue webhook event %s", event_type, exc_info=True)


def job_event_data(job) -> dict[str, Any]:
    """The job's facts a LIMS acts on; bulky per-field lists stay behind the job URL."""
    summary = job.summary or {}
    compact = {
        k: v
        for k, v in summary.items()
        if isinstance(v, (int, float, str, bool)) or k in ("failed_fields", "qc", "metrics")
    }
    params = job.params or {}
    return {
        "job_id": job.id,
        "kind": job.kind,
        "status": job.status,
        "error": job.error,
        "plate": params.get("plate"),
        "cell_line": params.get("cell_line"),
        "summary": compact,
        "links": {"job": f"/api/v1/jobs/{job.id}"},
    }


# ---------------------------------------------------------------------------------------------
# Delivery


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Delay before retry number ``attempt`` (1 = first retry): base · 2^(attempt-1), capped."""
    return min(max_s, base_s * (2 ** max(0, attempt - 1)))


def _pinned_request(url: str, address: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The URL rewritten to the checked address, with the Host header and TLS SNI of the name."""
    parts = urlsplit(url)
    host_for_url = f"[{address}]" if ":" in address else address
    netloc = host_for_url + (f":{parts.port}" if parts.port else "")
    pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
    host_header = parts.hostname + (f":{parts.port}" if parts.port else "")  # type: ignore[operator]
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    return pinned, {"Host": host_header}, extensions


def _claim(session: Session, delivery: WebhookDelivery, now: datetime) -> bool:
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery.id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at == delivery.next_attempt_at,
        )
        .values(next_attempt_at=now + timedelta(seconds=CLAIM_LEASE_S))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1  # type: ignore[attr-defined]


def attempt_delivery(session: Session, delivery: WebhookDelivery, settings, *, client=None) -> WebhookAttempt:
    import httpx

    sub = session.get(WebhookSubscription, delivery.subscription_id)
    body = json.dumps(delivery.payload, separators=(",", ":"), sort_keys=True).encode()
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "CellFuse-Webhooks/1",
        EVENT_ID_HEADER: delivery.event_id,
        EVENT_TYPE_HEADER: delivery.event_type,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(sub.secret, timestamp, body),  # type: ignore[union-attr]
    }
    started = time.perf_counter()
    status_code, error = None, None
    try:
        # Re-resolved and re-checked now: the answer may differ from the one at subscription time.
        address = resolve_target(sub.url, allow_private=settings.webhook_allow_private)[0]  # type: ignore[union-attr]
        url, host_header, extensions = _pinned_request(sub.url, address)  # type: ignore[union-attr]
        own_client = client or httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)
        try:
            response = own_client.post(url, content=body, headers={**headers, **host_header}, extensions=extensions)
        finally:
            if client is None:
                own_client.close()
        status_code = response.status_code
        if not 200 <= status_code < 300:
            error = f"the receiver answered HTTP {status_code}"
    except WebhookTargetError as exc:
        error = str(exc)
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:500]
    duration_ms = round((time.perf_counter() - started) * 1000.0, 2)
    number = delivery.attempts + 1
    attempt = WebhookAttempt(
        delivery_id=delivery.id, number=number, status_code=status_code, error=error, duration_ms=duration_ms
    )
    session.add(attempt)
    now = utcnow()
    delivery.attempts = number
    delivery.last_status_code = status_code
    delivery.last_error = error
    if error is None:
        delivery.status, delivery.finished_at = "delivered", now
    elif number >= settings.webhook_max_attempts:
        delivery.status, delivery.finished_at = "failed", now
    else:
        delivery.next_attempt_at = now + timedelta(
            seconds=backoff_s(number, settings.webhook_backoff_s, settings.webhook_backoff_max_s)
        )
    session.commit()
    return attempt


def deliver_due(session: Session, settings, *, limit: int = 50, now: datetime | None = None) -> int:
    """Send every due delivery once; returns how many attempts were made."""
    now = now or datetime.now(timezone.utc)
    due = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(limit)
    ).all()
    made = 0
    for delivery in due:
        if not _claim(session, delivery, now):
            continue
        session.refresh(delivery)
        attempt_delivery(session, delivery, settings)
        made += 1
    return made


def webhook_loop(stop, settings) -> None:
    """Post due deliveries until ``stop`` is set (a thread of every API process)."""
    from app.db import session_factory

    factory = session_factory(settings.resolved_database_url)
    while True:
        try:
            with factory() as session:
                deliver_due(session, settings)
        except Exception:
            log.warning("webhook dispatch failed; retrying next interval", exc_info=True)
        if stop.wait(settings.webhook_poll_s):
            break
