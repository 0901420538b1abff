"""Dashboard sign-ins: sessions (an HTTP-only cookie holds the token) and single-use sign-in
links. Only SHA-256 hashes of the tokens are stored."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from coordinator.models.account import utcnow


class WebSession(SQLModel, table=True):
    __tablename__ = "web_sessions"

    token_hash: str = Field(primary_key=True, max_length=64)
    kind: str = Field(max_length=8)  # "session" | "link"
    role: str = Field(max_length=16)  # "operator" | "seller" | "buyer"
    subject: str | None = Field(default=None, max_length=64)  # node id (seller), account id (buyer)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime = Field(index=True)
    used_at: datetime | None = None  # a link, once redeemed
