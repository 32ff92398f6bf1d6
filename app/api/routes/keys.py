"""API keys for admins: create (the key is shown once), list (prefixes only), revoke."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import func, select

from app.api.deps import AdminDep, IdPath, InstrumentDep, SessionDep
from app.api.errors import Problem
from app.api.schemas import ApiKeyCreatedOut, ApiKeyIn, ApiKeyOut, KeyIdentityOut
from app.models import ApiKey, utcnow
from app.security import create_key

router = APIRouter(prefix="/api/v1/keys", tags=["keys"])


@router.get("", response_model=list[ApiKeyOut], summary="List API keys (prefixes only)")
def list_keys(session: SessionDep, _: AdminDep) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


@router.post(
    "", response_model=ApiKeyCreatedOut, status_code=201, summary="Create an API key; the key is in this response only"
)
def create_api_key(body: ApiKeyIn, session: SessionDep, _: AdminDep) -> ApiKeyCreatedOut:
    row, key = create_key(session, body.name, body.role)
    return ApiKeyCreatedOut(**ApiKeyOut.model_validate(row).model_dump(), key=key)


@router.post(
    "/{key_id}/revoke", response_model=ApiKeyOut, summary="Revoke a key; it stops working with the next request"
)
def revoke_api_key(key_id: IdPath, session: SessionDep, _: AdminDep) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise Problem(404, f"no API key with id {key_id}", slug="key-not-found")
    if row.revoked_at is None:
        if row.role == "admin":
            # Revoking the last admin key would lock everyone out of key management.
            active_admins = (
                session.scalar(
                    select(func.count()).select_from(ApiKey).where(ApiKey.role == "admin", ApiKey.revoked_at.is_(None))
                )
                or 0
            )
            if active_admins <= 1:
                raise Problem(
                    409, "this is the last active admin key; create another admin key first", slug="last-admin-key"
                )
        row.revoked_at = utcnow()
        session.commit()
    return row


@router.get("/me", response_model=KeyIdentityOut, summary="The calling key's name and role (any role)")
def who_am_i(principal: InstrumentDep) -> KeyIdentityOut:
    return KeyIdentityOut(id=principal.key_id, name=principal.name, role=principal.role)
