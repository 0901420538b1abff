"""Ledger tables (prefix `ledger_`, on the shared SQLModel metadata) and their enums.

Amounts are BIGINT nano-USD. Transfers are immutable rows; an account's `balance` is kept
in step with its transfers inside the same transaction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, UniqueConstraint
from sqlmodel import Field, SQLModel


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class AccountKind(str, enum.Enum):
    BUYER = "buyer"
    SELLER_EARNINGS = "seller_earnings"
    SELLER_STAKE = "seller_stake"
    ESCROW = "escrow"
    PLATFORM_FEES = "platform_fees"
    EXTERNAL = "external"


SYSTEM_KINDS = {AccountKind.ESCROW, AccountKind.PLATFORM_FEES, AccountKind.EXTERNAL}
MAY_GO_NEGATIVE = {AccountKind.EXTERNAL}
# Rows per system account kind (see Ledger.system). Fixed: a hold's escrow shard is
# derived from its buyer's id, so changing this needs a data migration.
SYSTEM_SHARDS = 16
SHARDED_KINDS = {AccountKind.ESCROW, AccountKind.PLATFORM_FEES}


class HoldState(str, enum.Enum):
    PENDING = "pending"
    POSTED = "posted"
    VOIDED = "voided"


class LedgerAccount(SQLModel, table=True):
    __tablename__ = "ledger_accounts"
    __table_args__ = (UniqueConstraint("kind", "ref", name="uq_ledger_account_kind_ref"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: AccountKind = Field(index=True)
    ref: str = Field(max_length=120)
    balance: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    created_at: datetime = Field(default_factory=_utcnow)


class LedgerTransfer(SQLModel, table=True):
    __tablename__ = "ledger_transfers"

    id: int | None = Field(default=None, primary_key=True)
    debit_account_id: int = Field(foreign_key="ledger_accounts.id", index=True)
    credit_account_id: int = Field(foreign_key="ledger_accounts.id", index=True)
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    kind: str = Field(max_length=32)
    hold_id: int | None = Field(default=None, index=True)
    request_ref: str | None = Field(default=None, max_length=64, index=True)
    created_at: datetime = Field(default_factory=_utcnow)


class LedgerHold(SQLModel, table=True):
    __tablename__ = "ledger_holds"

    id: int | None = Field(default=None, primary_key=True)
    buyer_account_id: int = Field(foreign_key="ledger_accounts.id", index=True)
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    state: HoldState = Field(default=HoldState.PENDING, index=True)
    request_ref: str | None = Field(default=None, max_length=64, index=True)
    expires_at: datetime | None = Field(default=None, index=True)
    created_at: datetime = Field(default_factory=_utcnow)
    resolved_at: datetime | None = None
    posted_amount: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))


class LedgerIdempotency(SQLModel, table=True):
    __tablename__ = "ledger_idempotency"

    key: str = Field(primary_key=True, max_length=200)
    op: str = Field(max_length=32)
    params_hash: str = Field(max_length=64)
    result: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=_utcnow, index=True)  # pruned by age


@dataclass(frozen=True)
class SettleResult:
    hold_id: int
    charged: int  # total gross posted
    fee: int
    refunded: int
    subsidised: int = 0  # paid to sellers by the platform on top of the buyer's charge


class UnbondingState(str, enum.Enum):
    PENDING = "pending"
    WITHDRAWN = "withdrawn"


class LedgerUnbonding(SQLModel, table=True):
    """A seller's request to withdraw stake; paid out (SELLER_STAKE -> EXTERNAL) once
    `matures_at` has passed. Until then the amount stays in the stake account, slashable."""

    __tablename__ = "ledger_unbondings"

    id: int | None = Field(default=None, primary_key=True)
    stake_account_id: int = Field(foreign_key="ledger_accounts.id", index=True)
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    state: UnbondingState = Field(default=UnbondingState.PENDING, index=True)
    requested_at: datetime = Field(default_factory=_utcnow)
    matures_at: datetime = Field(index=True)
    withdrawn_amount: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, default=0))
    resolved_at: datetime | None = None
