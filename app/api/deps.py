"""Dependencies shared by routes: settings, a database session, the caller and their role."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Query, Request, Response
from fastapi.security import APIKeyHeader
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.api.errors import Problem
from app.api.gate import PRINCIPAL_STATE
from app.api.schemas import MAX_ID
from app.db import session_factory
from app.job_params import storable_problem
from app.security import Principal, authenticate
from app.settings import Settings
from app.storage import BlobStore


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    session = session_factory(settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_blobs(settings: SettingsDep) -> BlobStore:
    return BlobStore(settings.blob_dir)


BlobsDep = Annotated[BlobStore, Depends(get_blobs)]

_api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="An API key created with `cellfuse keys create`"
)


def get_principal(
    request: Request, session: SessionDep, key: Annotated[str | None, Depends(_api_key_header)]
) -> Principal:
    # The request gate has checked the key already (before the body was read): do not look it up twice.
    checked = request.scope.get("state", {}).get(PRINCIPAL_STATE)
    if isinstance(checked, Principal):
        return checked
    if not key:
        raise Problem(
            401,
            "this endpoint needs an API key in the X-API-Key header",
            slug="missing-api-key",
            headers={"WWW-Authenticate": "APIKey"},
        )
    principal = authenticate(session, key)
    if principal is None:
        raise Problem(
            401,
            "the API key is unknown or has been revoked",
            slug="invalid-api-key",
            headers={"WWW-Authenticate": "APIKey"},
        )
    return principal


def require_role(role: str):
    def _check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not principal.has_role(role):
            raise Problem(
                403, f"this action needs the '{role}' role; your key has '{principal.role}'", slug="insufficient-role"
            )
        return principal

    return _check


InstrumentDep = Annotated[Principal, Depends(require_role("instrument"))]
ScientistDep = Annotated[Principal, Depends(require_role("scientist"))]
AdminDep = Annotated[Principal, Depends(require_role("admin"))]


#: Listings are paged: ``limit`` (at most MAX_PAGE) rows from ``offset``; X-Total-Count has the total.
DEFAULT_PAGE = 100
MAX_PAGE = 500


@dataclass(frozen=True)
class PageParams:
    limit: int
    offset: int

    def rows(self, session: Session, stmt, response: Response) -> list:
        total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
        response.headers["X-Total-Count"] = str(total)
        return list(session.scalars(stmt.limit(self.limit).offset(self.offset)))


def page_params(
    limit: Annotated[
        int,
        Query(
            ge=1,
            le=MAX_PAGE,
            description=f"rows per page (at most {MAX_PAGE}); the total is in the X-Total-Count header",
        ),
    ] = DEFAULT_PAGE,
    offset: Annotated[int, Query(ge=0, le=10_000_000, description="rows to skip")] = 0,
) -> PageParams:
    return PageParams(limit=limit, offset=offset)


PageDep = Annotated[PageParams, Depends(page_params)]


async def check_text_params(request: Request) -> None:
    """Query, path and form values must be storable text (no NUL, no unpaired surrogate).

    JSON bodies are checked by their models; these are the values that reach SQL without one.
    """
    items = [("query", k, v) for k, v in request.query_params.multi_items()]
    items += [("path", k, v) for k, v in request.path_params.items()]
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form()  # parsed already for the route: this is the cached form
        items += [("form", k, v) for k, v in form.multi_items() if isinstance(v, str)]
    for where, name, value in items:
        if isinstance(value, str) and (problem := storable_problem(value, f"{where}.{name}")):
            raise Problem(
                422,
                f"the request is not valid: {problem}",
                slug="validation-error",
                errors=[{"location": f"{where}.{name}", "message": problem, "type": "unstorable_value"}],
            )


#: A row id in a path: out-of-range numbers are a 422, never a driver overflow (500).
IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
