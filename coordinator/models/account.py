"""Buyer accounts and their API keys (stored as SHA-256 hashes, never in clear)."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import false
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class AccountBase(SQLModel):
    name: str = Field(max_length=100)


class Account(AccountBase, table=True):
    __tablename__ = "accounts"

    id: str = Field(primary_key=True, max_length=40)
    ledger_account_id: int = Field(index=True)
    created_at: datetime = Field(default_factory=utcnow)
    # answers to its deterministic requests are cached and served again (response_cache.py);
    # a request's X-Agora-Cache header overrides it
    response_cache: bool = Field(default=False, sa_column_kwargs={"server_default": false()})


class AccountPublic(AccountBase):
    id: str
    balance_nano_usd: int  # spendable now
    held_nano_usd: int = 0  # in escrow for requests not yet settled (their unused part comes back)
    response_cache: bool = False  # the account's default for the response cache (X-Agora-Cache overrides it)


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    id: int | None = Field(default=None, primary_key=True)
    account_id: str = Field(foreign_key="accounts.id", index=True)
    key_hash: str = Field(unique=True, max_length=64)
    prefix: str = Field(max_length=16)
    created_at: datetime = Field(default_factory=utcnow)
    revoked: bool = False
