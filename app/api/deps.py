"""Dependencies shared by routes: settings, a database session, the caller and their role."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import APIKeyHeader
from sqlalchemy.orm import Session

from app.api.errors import Problem
from app.api.gate import PRINCIPAL_STATE
from app.api.schemas import MAX_ID, storable_problem
from app.db import session_factory
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

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                               description="An API key created with `cellfuse keys create`")


def get_principal(request: Request, session: SessionDep,
                  key: Annotated[str | None, Depends(_api_key_header)]) -> Principal:
    # The request gate has checked the key already (before the body was read): do not look it up twice.
    checked = request.scope.get("state", {}).get(PRINCIPAL_STATE)
    if isinstance(checked, Principal):
        return checked
    if not key:
        raise Problem(401, "this endpoint needs an API key in the X-API-Key header",
                      slug="missing-api-key", headers={"WWW-Authenticate": "APIKey"})
    principal = authenticate(session, key)
    if principal is None:
        raise Problem(401, "the API key is unknown or has been revoked", slug="invalid-api-key",
                      headers={"WWW-Authenticate": "APIKey"})
    return principal


def require_role(role: str):
    def _check(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
        if not principal.has_role(role):
            raise Problem(403, f"this action needs the '{role}' role; your key has '{principal.role}'",
                          slug="insufficient-role")
        return principal

    return _check


InstrumentDep = Annotated[Principal, Depends(require_role("instrument"))]
ScientistDep = Annotated[Principal, Depends(require_role("scientist"))]
AdminDep = Annotated[Principal, Depends(require_role("admin"))]


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
            raise Problem(422, f"the request is not valid: {problem}", slug="validation-error",
                          errors=[{"location": f"{where}.{name}", "message": problem, "type": "unstorable_value"}])


#: A row id in a path: out-of-range numbers are a 422, never a driver overflow (500).
IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
