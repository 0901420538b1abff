"""API keys: generated once, shown once, stored as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time

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


class KeyCache:
    """Valid API keys seen lately (by hash) and their accounts (detached, read-only), so
    that a buyer's requests after its first do not query the database to authenticate.
    Only keys that were found are kept (a wrong key is looked up every time, and refused),
    each for `ttl_s`: a key revoked in the database stops working within that time. At most
    `size` keys; the oldest goes first."""

    def __init__(self, ttl_s: float = 30.0, size: int = 10_000):
        self.ttl_s, self.size = ttl_s, size
        self._keys: dict[str, tuple[float, Account]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Account | None:
        h = hash_key(key)
        with self._lock:
            hit = self._keys.get(h)
        if hit is not None and time.monotonic() - hit[0] < self.ttl_s:
            return hit[1]
        return None

    def put(self, key: str, account: Account) -> None:
        if self.ttl_s <= 0:
            return
        with self._lock:
            if len(self._keys) >= self.size:
                self._keys.pop(next(iter(self._keys)))
            self._keys[hash_key(key)] = (time.monotonic(), account)

    def forget(self, key: str) -> None:
        with self._lock:
            self._keys.pop(hash_key(key), None)


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
