"""API keys: generated once, shown once, stored as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from fastapi import Request
from sqlmodel import Session, select

from coordinator.errors import Forbidden, Unauthorized
from coordinator.models import Account, ApiKey

KEY_PREFIX = "sk-agora-"


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def account_for_key(session: Session, key: str) -> Account | None:
    row = session.exec(
        select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked == False)  # noqa: E712
    ).first()
    return session.get(Account, row.account_id) if row else None


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return token.strip()


def require_admin(request: Request) -> None:
    settings = request.app.state.settings
    token = bearer_token(request)
    if not settings.admin_token or not hmac.compare_digest(token, settings.admin_token):
        raise Forbidden("this route needs the operator's admin token")
