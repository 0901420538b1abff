"""An account's statement: its transfers, newest first, in pages (keyset on transfer id)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_
from sqlalchemy.orm import aliased
from sqlmodel import Session, select

from pricing.errors import UnknownAccount
from pricing.ledger_models import LedgerAccount, LedgerTransfer

MAX_PAGE = 500


@dataclass(frozen=True)
class StatementEntry:
    transfer_id: int
    created_at: datetime
    kind: str             # deposit, hold, earning, fee, release, void, payout, slash, unbond
    amount: int           # signed: + credited to this account, - debited from it
    counterparty_id: int
    counterparty_kind: str
    hold_id: int | None
    request_ref: str | None


@dataclass(frozen=True)
class StatementPage:
    account_id: int
    balance: int
    entries: list[StatementEntry]
    next_cursor: int | None  # pass as `before` for the next (older) page; None at the end


def statement(session: Session, account_id: int, *, limit: int = 50, before: int | None = None,
              request_ref: str | None = None) -> StatementPage:
    """Transfers touching `account_id`, newest first; `before` is the cursor of the previous page."""
    acct = session.get(LedgerAccount, account_id)
    if acct is None:
        raise UnknownAccount(f"no ledger account {account_id}")
    limit = max(1, min(int(limit), MAX_PAGE))
    other = aliased(LedgerAccount)
    T = LedgerTransfer
    q = (select(T, other.kind)
         .join(other, other.id == ((T.debit_account_id + T.credit_account_id) - account_id))
         .where(or_(T.debit_account_id == account_id, T.credit_account_id == account_id)))
    if before is not None:
        q = q.where(T.id < before)
    if request_ref is not None:
        q = q.where(T.request_ref == request_ref)
    rows = session.exec(q.order_by(T.id.desc()).limit(limit + 1)).all()
    entries = []
    for t, other_kind in rows[:limit]:
        credit = t.credit_account_id == account_id
        entries.append(StatementEntry(
            transfer_id=t.id, created_at=t.created_at, kind=t.kind, amount=t.amount if credit else -t.amount,
            counterparty_id=t.debit_account_id if credit else t.credit_account_id,
            counterparty_kind=getattr(other_kind, "value", str(other_kind)),
            hold_id=t.hold_id, request_ref=t.request_ref))
    session.refresh(acct)
    nxt = entries[-1].transfer_id if len(rows) > limit else None
    return StatementPage(account_id, acct.balance, entries, nxt)


@dataclass(frozen=True)
class RequestCharges:
    """What one request cost, from its transfers: the buyer paid `charged` (held less
    released), of which `fees` went to the platform and `earnings` to each seller."""

    request_ref: str
    held: int
    charged: int
    refunded: int
    fees: int
    earnings: dict[int, int]  # seller earnings account -> net credited
    pending: bool             # a hold is still open: the charge is not final


def request_charges(session: Session, request_ref: str) -> RequestCharges:
    """The money movements of one request (its hold, settlement or void), summed."""
    T = LedgerTransfer
    rows = session.exec(select(T.kind, T.credit_account_id, T.amount).where(T.request_ref == request_ref)).all()
    held = sum(a for k, _, a in rows if k == "hold")
    refunded = sum(a for k, _, a in rows if k in ("release", "void"))
    fees = sum(a for k, _, a in rows if k in ("fee", "cache"))  # "cache": a cached answer's price, no hold
    earnings: dict[int, int] = {}
    for k, credit, a in rows:
        if k == "earning":
            earnings[credit] = earnings.get(credit, 0) + a
    posted = fees + sum(earnings.values())
    return RequestCharges(request_ref, held, held - refunded if held else posted, refunded, fees, earnings,
                          pending=held > posted + refunded)
