"""Who is looking at a dashboard page: sign-in by credential or single-use link, a session
cookie, and the access rule.

- operator: the admin token (`AGORA_ADMIN_TOKEN`) typed into the login form, or a link
  `agora up` prints; sees every page.
- buyer: its API key typed into the login form; sees only its own usage.
- seller: a link its node agent asks for with a signed message (`agora node coach --link`);
  sees only its own node's coach page.

Tokens are random, shown once, stored as SHA-256 hashes (`WebSession`); the session token
travels only in an HTTP-only, SameSite=Strict cookie, never in a URL. A link works once and
expires after `login_link_s`; a session after `web_session_s`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, update
from sqlmodel import Session, col

from coordinator.auth import KEY_PREFIX, account_for_key
from coordinator.models import WebSession
from coordinator.models.account import utcnow
from coordinator.settings import CoordinatorSettings

COOKIE = "agora_session"
ROLES = ("operator", "seller", "buyer")


@dataclass(frozen=True)
class Principal:
    role: str
    subject: str | None = None  # node id (seller), account id (buyer)

    def may_see_node(self, node_id: str) -> bool:
        return self.role == "operator" or (self.role == "seller" and self.subject == node_id)

    def may_see_account(self, account_id: str) -> bool:
        return self.role == "operator" or (self.role == "buyer" and self.subject == account_id)

    @property
    def home(self) -> str:
        return {"operator": "/dashboard", "seller": "/dashboard/coach", "buyer": "/dashboard/usage"}[self.role]


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _issue(session: Session, kind: str, principal: Principal, ttl_s: float) -> str:
    if principal.role not in ROLES:
        raise ValueError(f"unknown role {principal.role!r}")
    token = secrets.token_urlsafe(32)
    session.add(WebSession(token_hash=_hash(token), kind=kind, role=principal.role, subject=principal.subject,
                           expires_at=utcnow() + timedelta(seconds=ttl_s)))
    session.flush()
    return token


def issue_link(session: Session, principal: Principal, settings: CoordinatorSettings) -> str:
    """A single-use sign-in token for `/login/link/<token>`."""
    return _issue(session, "link", principal, settings.login_link_s)


def start_session(session: Session, principal: Principal, settings: CoordinatorSettings) -> str:
    return _issue(session, "session", principal, settings.web_session_s)


def redeem_link(session: Session, token: str, settings: CoordinatorSettings) -> tuple[Principal, str] | None:
    """Spend a link (once: a conditional UPDATE, so two clicks racing get one session) and
    start a session for its principal. None: unknown, used or expired."""
    now = utcnow()
    h = _hash(token)
    spent = session.exec(update(WebSession).where(  # type: ignore[call-overload]
        WebSession.token_hash == h, WebSession.kind == "link", col(WebSession.used_at).is_(None),
        col(WebSession.expires_at) > now).values(used_at=now))
    if spent.rowcount != 1:
        return None
    row = session.get(WebSession, h)
    principal = Principal(row.role, row.subject)
    return principal, start_session(session, principal, settings)


def principal_for(session: Session, token: str | None) -> Principal | None:
    if not token:
        return None
    row = session.get(WebSession, _hash(token))
    if row is None or row.kind != "session" or _aware(row.expires_at) <= utcnow():
        return None
    return Principal(row.role, row.subject)


def end_session(session: Session, token: str | None) -> None:
    if token:
        session.exec(delete(WebSession).where(WebSession.token_hash == _hash(token)))  # type: ignore[call-overload]


def principal_for_credential(session: Session, credential: str, settings: CoordinatorSettings) -> Principal | None:
    """The login form: the operator's admin token, or a buyer's API key."""
    credential = credential.strip()
    if settings.admin_token and hmac.compare_digest(credential.encode(), settings.admin_token.encode()):
        return Principal("operator")
    if credential.startswith(KEY_PREFIX):
        account = account_for_key(session, credential)
        if account is not None:
            return Principal("buyer", account.id)
    return None


def prune(session: Session) -> int:
    """Expired sessions and links (the sweep calls this)."""
    return session.exec(delete(WebSession).where(  # type: ignore[call-overload]
        col(WebSession.expires_at) < utcnow())).rowcount or 0
