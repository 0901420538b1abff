"""Batched settlement: many holds settled in one transaction with set-based SQL.

`settle_many` does what `Ledger.settle_hold` does for each item — same rules, same fee
rounding, same idempotency keys and stored results, so a replay through either path
returns the first answer — but in a fixed number of statements per batch: a plain read of
the holds (their amount, buyer and request never change), one insert claiming every key
with its result (ON CONFLICT DO NOTHING), one locking read of the holds and one of the
accounts (in id order), one bulk insert of the transfers, and set-based updates of the
balances and holds.

Locks are taken in the same order as the single path (`Ledger._once`, then
`settle_hold`): idempotency keys first (sorted), then holds, then accounts (by id). A key
that another transaction is claiming makes the batch wait for it, and then replay its
answer; so a batch racing a redelivered single settlement of the same holds neither
deadlocks nor reports a replay as "hold not pending".

Per-item problems (hold not pending, over-settlement, a non-seller part, a key reused with
other parameters) come back as exception objects in the result list and do not stop the
rest of the batch; the keys of failed items are released, as the single path does.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Sequence

from sqlalchemy import bindparam, delete, insert, select, text, update
from sqlmodel import Session

from pricing.errors import (
    HoldExceeded, HoldNotPending, IdempotencyConflict, LedgerError, WrongAccountKind,
)
from pricing.ledger import Ledger, _hash
from pricing.ledger_models import (
    MAY_GO_NEGATIVE, AccountKind, HoldState, LedgerAccount, LedgerHold, LedgerIdempotency, LedgerTransfer,
    SettleResult, _utcnow,
)
from pricing.money import fee_of

CHUNK = 500  # ids per IN (...) list: within SQLite's bound-parameter limit


@dataclass(frozen=True)
class Settlement:
    hold_id: int
    parts: list[tuple[int, int]]  # (seller earnings account, gross)
    idempotency_key: str
    # (seller earnings account, net) the platform pays on top of the buyer's charge: tokens
    # a seller delivered that the market lost before the buyer got them. From the fee
    # shard of the buyer as far as it holds, the rest from EXTERNAL (the operator's money).
    subsidy: tuple[tuple[int, int], ...] = ()


def _params(it: Settlement, fee_bps: int) -> dict:
    params = {"op": "settle", "hold": it.hold_id, "parts": it.parts, "fee_bps": fee_bps}
    if it.subsidy:
        params["subsidy"] = [list(p) for p in it.subsidy]
    return params


def _chunks(xs: list, n: int = CHUNK):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


def settle_many(session: Session, items: Sequence[Settlement], *, fee_bps: int
                ) -> list[SettleResult | LedgerError]:
    """Settle `items` inside the caller's transaction; results in the same order."""
    fee_of(0, fee_bps)  # validates fee_bps
    session.flush()
    led = Ledger(session)
    items = [Settlement(int(it.hold_id), [(int(a), int(g)) for a, g in it.parts], it.idempotency_key,
                        tuple((int(a), int(n)) for a, n in it.subsidy if int(n)))
             for it in items]
    out: list = [None] * len(items)
    hashes = [_hash(_params(it, fee_bps)) for it in items]
    H, A, I = LedgerHold.__table__, LedgerAccount.__table__, LedgerIdempotency.__table__

    # 1. well-formed items; a key repeated within the batch replays its first occurrence
    todo, first_in_batch = [], {}
    for i, it in enumerate(items):
        k = it.idempotency_key
        if not k:
            out[i] = LedgerError("an idempotency key is required")
        elif k in first_in_batch:
            out[i] = ("dup", first_in_batch[k], hashes[i])  # resolved at the end
        elif any(g < 0 for _, g in it.parts) or any(n < 0 for _, n in it.subsidy):
            out[i] = LedgerError("settlement amounts must be >= 0")
        else:
            first_in_batch[k] = i
            todo.append(i)

    # 2. each item's result follows from its parts and the hold's amount (never changes)
    info = {}
    for chunk in _chunks(sorted({items[i].hold_id for i in todo})):
        info.update({r.id: r for r in session.execute(
            select(H.c.id, H.c.amount, H.c.state).where(H.c.id.in_(chunk)))})
    now = _utcnow()
    claims, failed = [], {}  # failed: item -> error, unless its key replays an earlier answer
    for i in todo:
        it, h = items[i], info.get(items[i].hold_id)
        gross = sum(g for _, g in it.parts)
        if h is None:
            failed[i] = LedgerError(f"no hold {it.hold_id}")
        elif HoldState(h.state) != HoldState.PENDING:  # a resolved hold stays resolved
            failed[i] = HoldNotPending(f"hold {h.id} is already {HoldState(h.state).value}")
        elif gross > h.amount:
            failed[i] = HoldExceeded(f"settlement {gross} exceeds hold {h.amount}")
        else:
            out[i] = SettleResult(h.id, gross, sum(fee_of(g, fee_bps) for _, g in it.parts), h.amount - gross,
                                  sum(n for _, n in it.subsidy))
            claims.append({"key": it.idempotency_key, "params_hash": hashes[i], "result": asdict(out[i])})

    # 3. claim the keys (waits for any transaction claiming one of them); the rest replay
    claimed = _claim(session, sorted(claims, key=lambda c: c["key"]), now)
    unclaimed = [i for i in todo if i in failed or items[i].idempotency_key not in claimed]
    prior = {}
    for chunk in _chunks([items[i].idempotency_key for i in unclaimed]):
        prior.update({k: (h, r) for k, h, r in session.execute(
            select(I.c.key, I.c.params_hash, I.c.result).where(I.c.key.in_(chunk)))})
    for i in unclaimed:
        k = items[i].idempotency_key
        if k in prior:
            h, r = prior[k]
            out[i] = SettleResult(**r) if h == hashes[i] else IdempotencyConflict(
                f"idempotency key {k!r} was used before")
        elif i in failed:
            out[i] = failed[i]
        else:  # the claim's owner committed, yet no row: cannot happen while keys are kept
            out[i] = LedgerError(f"idempotency key {k!r} vanished; retry")
    mine = [i for i in todo if i not in failed and items[i].idempotency_key in claimed]

    # 4. lock the holds, then the accounts, in id order
    holds = {}
    for chunk in _chunks(sorted({items[i].hold_id for i in mine})):
        holds.update({row.id: row for row in session.execute(
            select(H.c.id, H.c.buyer_account_id, H.c.amount, H.c.state, H.c.request_ref)
            .where(H.c.id.in_(chunk)).order_by(H.c.id).with_for_update())})
    acct_ids, shards = set(), {}
    for i in mine:
        h = holds[items[i].hold_id]
        acct_ids.update((h.buyer_account_id, led._sys(AccountKind.ESCROW, h.buyer_account_id, shards),
                         led._sys(AccountKind.PLATFORM_FEES, h.buyer_account_id, shards)))
        acct_ids.update(a for a, _ in items[i].parts)
        acct_ids.update(a for a, _ in items[i].subsidy)
    if any(items[i].subsidy for i in mine):
        acct_ids.add(led._sys(AccountKind.EXTERNAL, 0, shards))
    accounts = {}
    for chunk in _chunks(sorted(acct_ids)):
        accounts.update({row.id: row for row in session.execute(
            select(A.c.id, A.c.kind, A.c.balance).where(A.c.id.in_(chunk)).order_by(A.c.id).with_for_update())})

    # 5. decide, in Python, every transfer of the batch
    delta: dict[int, int] = defaultdict(int)
    transfers, hold_updates, released, settled_holds = [], [], [], set()

    def move(debit, credit, amount, kind, h):
        if amount:
            delta[debit] -= amount
            delta[credit] += amount
            transfers.append({"debit_account_id": debit, "credit_account_id": credit, "amount": amount,
                              "kind": kind, "hold_id": h.id, "request_ref": h.request_ref, "created_at": now})

    for i in mine:
        it, h = items[i], holds[items[i].hold_id]
        if HoldState(h.state) != HoldState.PENDING or h.id in settled_holds:
            state = "posted" if h.id in settled_holds else HoldState(h.state).value
            out[i] = HoldNotPending(f"hold {h.id} is already {state}")
        elif any(a not in accounts or AccountKind(accounts[a].kind) != AccountKind.SELLER_EARNINGS
                 for a, _ in (*it.parts, *it.subsidy)):
            out[i] = WrongAccountKind("settlement parts are paid to seller earnings accounts")
        else:
            escrow = led._sys(AccountKind.ESCROW, h.buyer_account_id, shards)
            platform = led._sys(AccountKind.PLATFORM_FEES, h.buyer_account_id, shards)
            for a, g in it.parts:
                fee = fee_of(g, fee_bps)
                move(escrow, a, g - fee, "earning", h)
                move(escrow, platform, fee, "fee", h)
            move(escrow, h.buyer_account_id, out[i].refunded, "release", h)
            for a, n in it.subsidy:
                from_fees = min(n, max(0, accounts[platform].balance + delta[platform]))
                move(platform, a, from_fees, "relay_loss", h)
                move(led._sys(AccountKind.EXTERNAL, 0, shards), a, n - from_fees, "relay_loss", h)
            settled_holds.add(h.id)
            hold_updates.append({"_id": h.id, "_posted": out[i].charged, "_at": now})
            continue
        released.append(it.idempotency_key)
    for a, d in delta.items():
        if d < 0 and accounts[a].balance + d < 0 and AccountKind(accounts[a].kind) not in MAY_GO_NEGATIVE:
            raise LedgerError(f"account {a} would go negative: the holds and escrow disagree")

    # 6. write it all
    for chunk in _chunks(released):  # failed items give their keys back
        session.execute(delete(I).where(I.c.key.in_(chunk)))
    _insert_transfers(session, transfers, now)
    if delta:
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


def _claim(session: Session, rows: list[dict], now) -> set[str]:
    """Insert the idempotency records (keys in sorted order); returns the keys this call
    inserted. A key held by a transaction in flight blocks until that one ends."""
    if not rows:
        return set()
    I = LedgerIdempotency.__table__
    if not _pg(session):
        # SQLite runs one writer at a time (BEGIN IMMEDIATE): no claim can appear between
        # this read and the insert, so skip the existing keys and executemany the rest
        taken = set()
        for chunk in _chunks([r["key"] for r in rows]):
            taken.update(session.execute(select(I.c.key).where(I.c.key.in_(chunk))).scalars())
        new = [{**r, "op": "settle", "created_at": now} for r in rows if r["key"] not in taken]
        if new:
            session.execute(insert(I), new)
        return {r["key"] for r in new}
    return set(session.execute(text(
        "INSERT INTO ledger_idempotency (key, op, params_hash, result, created_at)"
        " SELECT k, 'settle', p, CAST(r AS json), :now FROM unnest(CAST(:k AS text[]), CAST(:p AS text[]),"
        " CAST(:r AS text[])) WITH ORDINALITY AS t(k, p, r, n) ORDER BY n"
        " ON CONFLICT (key) DO NOTHING RETURNING key"),
        {"now": now, "k": [r["key"] for r in rows], "p": [r["params_hash"] for r in rows],
         "r": [json.dumps(r["result"]) for r in rows]}).scalars())


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
