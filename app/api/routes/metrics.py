"""``GET /metrics``: Prometheus text format, for an admin key or the scraper's bearer token."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import SessionDep, SettingsDep, _api_key_header
from app.api.errors import Problem
from app.security import authenticate

router = APIRouter(tags=["system"])


def _allowed(
    session: SessionDep,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
    key: Annotated[str | None, Depends(_api_key_header)] = None,
) -> None:
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    if token and authorization and authorization.startswith("Bearer "):
        if hmac.compare_digest(authorization.removeprefix("Bearer ").encode(), token.encode()):
            return
    if key:
        principal = authenticate(session, key)
        if principal is not None and principal.has_role("admin"):
            return
        if principal is not None:
            raise Problem(
                403, f"/metrics needs the 'admin' role; your key has '{principal.role}'", slug="insufficient-role"
            )
    raise Problem(
        401,
        "/metrics needs an admin key (X-API-Key) or the metrics token "
        "(Authorization: Bearer …, CELLFUSE_METRICS_TOKEN)",
        slug="missing-api-key",
        headers={"WWW-Authenticate": "Bearer"},
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics (queues, jobs, durations, workers, GPU memory, HTTP)",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}}},
    dependencies=[Depends(_allowed)],
)
def metrics(request: Request) -> Response:
    registry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
