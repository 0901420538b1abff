"""Batched settlement: many holds settled in one transaction with set-based SQL.

`settle_many` does what `Ledger.settle_hold` does for each item — same rules, same fee
rounding, same idempotency keys and stored results, so a replay through either path
returns the first answer — but in a fixed number of statements per batch: one locking
read of the holds, one of the accounts (in id order), one bulk insert each for the
idempotency records and the transfers, and executemany updates of balances and holds.

Per-item problems (hold not pending, over-settlement, a non-seller part, a key reused with
other parameters) come back as exception objects in the result list and do not stop the
rest of the batch. If another transaction claims one of the batch's keys at the same time,
the batch falls back to settling item by item, which resolves the race per key.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Sequence

from sqlalchemy import bindparam, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from pricing.errors import (
    HoldExceeded, HoldNotPending, IdempotencyConflict, LedgerError, WrongAccountKind,
)
from pricing.ledger import Ledger, _hash
from pricing.ledger_models import (
    AccountKind, HoldState, LedgerAccount, LedgerHold, LedgerIdempotency, LedgerTransfer, SettleResult, _utcnow,
)
from pricing.money import fee_of

CHUNK = 500  # ids per IN (...) list: within SQLite's bound-parameter limit


@dataclass(frozen=True)
class Settlement:
    hold_id: int
    parts: list[tuple[int, int]]  # (seller earnings account, gross)
    idempotency_key: str


def _chunks(xs: list, n: int = CHUNK):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


def settle_many(session: Session, items: Sequence[Settlement], *, fee_bps: int
                ) -> list[SettleResult | LedgerError]:
    """Settle `items` inside the caller's transaction; results in the same order."""
    fee_of(0, fee_bps)  # validates fee_bps
    session.flush()
    led = Ledger(session)
    items = [Settlement(int(it.hold_id), [(int(a), int(g)) for a, g in it.parts], it.idempotency_key)
             for it in items]
    out: list[SettleResult | LedgerError | None] = [None] * len(items)
    hashes = [_hash({"op": "settle", "hold": it.hold_id, "parts": it.parts, "fee_bps": fee_bps}) for it in items]

    # 1. replays: keys already stored (or repeated earlier in this batch)
    I = LedgerIdempotency.__table__
    keys = list({it.idempotency_key for it in items})
    prior = {}
    for chunk in _chunks(keys):
        prior.update({k: (h, r) for k, h, r in session.execute(
            select(I.c.key, I.c.params_hash, I.c.result).where(I.c.key.in_(chunk)))})
    todo, first_in_batch = [], {}
    for i, it in enumerate(items):
        k = it.idempotency_key
        if not k:
            out[i] = LedgerError("an idempotency key is required")
        elif k in prior:
            h, r = prior[k]
            out[i] = SettleResult(**r) if h == hashes[i] else IdempotencyConflict(f"idempotency key {k!r} was used before")
        elif k in first_in_batch:
            out[i] = ("dup", first_in_batch[k], hashes[i])  # resolved after the batch
        elif any(g < 0 for _, g in it.parts):
            out[i] = LedgerError("settlement amounts must be >= 0")
        else:
            first_in_batch[k] = i
            todo.append(i)

    # 2. lock the holds, then the accounts, in id order
    H, A = LedgerHold.__table__, LedgerAccount.__table__
    hold_ids = sorted({items[i].hold_id for i in todo})
    holds = {}
    for chunk in _chunks(hold_ids):
        holds.update({row.id: row for row in session.execute(
            select(H.c.id, H.c.buyer_account_id, H.c.amount, H.c.state, H.c.request_ref)
            .where(H.c.id.in_(chunk)).order_by(H.c.id).with_for_update())})
    acct_ids, shards = set(), {}
    for i in todo:
        h = holds.get(items[i].hold_id)
        if h is not None:
            acct_ids.update((h.buyer_account_id, led._sys(AccountKind.ESCROW, h.buyer_account_id, shards),
                             led._sys(AccountKind.PLATFORM_FEES, h.buyer_account_id, shards)))
            acct_ids.update(a for a, _ in items[i].parts)
    accounts = {}
    for chunk in _chunks(sorted(acct_ids)):
        accounts.update({row.id: row for row in session.execute(
            select(A.c.id, A.c.kind, A.c.balance).where(A.c.id.in_(chunk)).order_by(A.c.id).with_for_update())})

    # 3. decide, in Python, every transfer of the batch
    now = _utcnow()
    delta: dict[int, int] = defaultdict(int)
    transfers, hold_updates, claims, settled_holds = [], [], [], set()

    def move(debit, credit, amount, kind, h):
        if amount:
            delta[debit] -= amount
            delta[credit] += amount
            transfers.append({"debit_account_id": debit, "credit_account_id": credit, "amount": amount,
                              "kind": kind, "hold_id": h.id, "request_ref": h.request_ref, "created_at": now})

    for i in todo:
        it = items[i]
        h = holds.get(it.hold_id)
        gross = sum(g for _, g in it.parts)
        if h is None:
            out[i] = LedgerError(f"no hold {it.hold_id}")
        elif HoldState(h.state) != HoldState.PENDING or h.id in settled_holds:
            state = "posted" if h.id in settled_holds else HoldState(h.state).value
            out[i] = HoldNotPending(f"hold {h.id} is already {state}")
        elif gross > h.amount:
            out[i] = HoldExceeded(f"settlement {gross} exceeds hold {h.amount}")
        elif any(a not in accounts or AccountKind(accounts[a].kind) != AccountKind.SELLER_EARNINGS
                 for a, _ in it.parts):
            out[i] = WrongAccountKind("settlement parts are paid to seller earnings accounts")
        else:
            escrow = led._sys(AccountKind.ESCROW, h.buyer_account_id, shards)
            platform = led._sys(AccountKind.PLATFORM_FEES, h.buyer_account_id, shards)
            fee_total = 0
            for a, g in it.parts:
                fee = fee_of(g, fee_bps)
                fee_total += fee
                move(escrow, a, g - fee, "earning", h)
                move(escrow, platform, fee, "fee", h)
            move(escrow, h.buyer_account_id, h.amount - gross, "release", h)
            settled_holds.add(h.id)
            hold_updates.append({"_id": h.id, "_posted": gross, "_at": now})
            res = SettleResult(h.id, gross, fee_total, h.amount - gross)
            claims.append({"key": it.idempotency_key, "op": "settle", "params_hash": hashes[i],
                           "result": asdict(res), "created_at": now})
            out[i] = res
    for a, d in delta.items():
        if d < 0 and accounts[a].balance + d < 0:
            raise LedgerError(f"account {a} would go negative: the holds and escrow disagree")

    # 4. write it all
    if claims:
        try:
            with session.begin_nested():
                _insert_claims(session, claims, now)
        except IntegrityError:  # a concurrent transaction claimed one of our keys
            return [r if isinstance(r, LedgerError) else _one_by_one(led, items[i], fee_bps)
                    for i, r in enumerate(_resolve_dups(out, hashes, items))]
        _insert_transfers(session, transfers, now)
        session.execute(update(A).where(A.c.id == bindparam("_id")).values(balance=A.c.balance + bindparam("_d")),
                        [{"_id": a, "_d": d} for a, d in sorted(delta.items()) if d])
        _post_holds(session, hold_updates, now)
    return _resolve_dups(out, hashes, items)


def _pg(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _insert_transfers(session: Session, rows: list[dict], now) -> None:
    """On PostgreSQL one INSERT ... SELECT FROM unnest(arrays) (a single cached statement
    whatever the batch size); elsewhere executemany (SQLite is in-process)."""
    if not rows:
        return
    if not _pg(session):
        session.execute(insert(LedgerTransfer.__table__), rows)
        return
    session.execute(text(
        "INSERT INTO ledger_transfers (debit_account_id, credit_account_id, amount, kind, hold_id, request_ref,"
        " created_at) SELECT d, c, a, k, h, r, :now FROM unnest(CAST(:d AS bigint[]), CAST(:c AS bigint[]),"
        " CAST(:a AS bigint[]), CAST(:k AS text[]), CAST(:h AS bigint[]), CAST(:r AS text[])) AS t(d, c, a, k, h, r)"),
        {"now": now, "d": [r["debit_account_id"] for r in rows], "c": [r["credit_account_id"] for r in rows],
         "a": [r["amount"] for r in rows], "k": [r["kind"] for r in rows], "h": [r["hold_id"] for r in rows],
         "r": [r["request_ref"] for r in rows]})


def _insert_claims(session: Session, rows: list[dict], now) -> None:
    I = LedgerIdempotency.__table__
    if not _pg(session):
        session.execute(insert(I), rows)
        return
    session.execute(text(
        "INSERT INTO ledger_idempotency (key, op, params_hash, result, created_at)"
        " SELECT k, 'settle', p, CAST(r AS json), :now FROM unnest(CAST(:k AS text[]), CAST(:p AS text[]),"
        " CAST(:r AS text[])) AS t(k, p, r)"),
        {"now": now, "k": [r["key"] for r in rows], "p": [r["params_hash"] for r in rows],
         "r": [json.dumps(r["result"]) for r in rows]})


def _post_holds(session: Session, rows: list[dict], now) -> None:
    """Mark holds POSTED with their posted amounts."""
    H = LedgerHold.__table__
    if not rows:
        return
    if not _pg(session):
        session.execute(update(H).where(H.c.id == bindparam("_id"))
                        .values(state=HoldState.POSTED, posted_amount=bindparam("_posted"),
                                resolved_at=bindparam("_at")), rows)
        return
    session.execute(text(
        "UPDATE ledger_holds SET state = 'POSTED', posted_amount = v.p, resolved_at = :now"
        " FROM unnest(CAST(:ids AS bigint[]), CAST(:ps AS bigint[])) AS v(id, p) WHERE ledger_holds.id = v.id"),
        {"now": now, "ids": [r["_id"] for r in rows], "ps": [r["_posted"] for r in rows]})


def _resolve_dups(out, hashes, items):
    """A key repeated within the batch replays its first occurrence (or conflicts)."""
    res = list(out)
    for i, r in enumerate(res):
        if isinstance(r, tuple) and r[0] == "dup":
            j = r[1]
            res[i] = res[j] if hashes[j] == r[2] else IdempotencyConflict(
                f"idempotency key {items[i].idempotency_key!r} was used before")
    return res


def _one_by_one(led: Ledger, it: Settlement, fee_bps: int) -> SettleResult | LedgerError:
    try:
        return led.settle_hold(it.hold_id, it.parts, fee_bps, idempotency_key=it.idempotency_key)
    except LedgerError as exc:
        return exc
