"""API keys: generated once, shown once, stored as sha256 hashes, with a role.

Roles nest: ``instrument`` < ``scientist`` < ``admin``.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ApiKey, utcnow
from app.vocabulary import ROLES

ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
KEY_PREFIX = "cf_"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    # Keys are 256-bit random strings, so a fast hash is enough (no dictionary to guard against).
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    key_id: int
    name: str
    role: str

    def has_role(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


def create_key(session: Session, name: str, role: str, key: str | None = None) -> tuple[ApiKey, str]:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    key = key or generate_key()
    row = ApiKey(name=name, role=role, prefix=key[:10], key_hash=hash_key(key))
    session.add(row)
    session.commit()
    return row, key


def ensure_key(session: Session, name: str, role: str, key: str) -> ApiKey:
    """Register a given key (bootstrap) unless it exists already."""
    existing = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    if existing is not None:
        return existing
    row, _ = create_key(session, name, role, key)
    return row


def authenticate(session: Session, key: str) -> Principal | None:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
    if row is None:
        return None
    return Principal(key_id=row.id, name=row.name, role=row.role)


def revoke_key(session: Session, key_id_or_prefix: str) -> int:
    rows = session.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None))).all()
    hits = [r for r in rows if str(r.id) == key_id_or_prefix or r.prefix == key_id_or_prefix]
    for row in hits:
        row.revoked_at = utcnow()
    session.commit()
    return len(hits)
