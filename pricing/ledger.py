"""The double-entry ledger: accounts, immutable transfers, two-phase escrow holds.

Every transfer debits one account and credits another by the same positive integer, and
both balances change in the same transaction, so the sum of all balances is always zero
(deposits come from the EXTERNAL account, which goes negative). Buyer, earnings and stake
balances never go negative: money leaves them only under a row lock after a check.

Holds are TigerBeetle-style: `create_hold` moves the amount from the buyer to ESCROW
(pending); `settle_hold` posts part of it to sellers and the platform fee and returns the
rest to the buyer; `void_hold` returns all of it. Each hold is resolved at most once.

Methods work inside the caller's transaction (flush, never commit) and lock the accounts
they touch in id order (SELECT ... FOR UPDATE on PostgreSQL), so concurrent transactions
serialise per account without deadlocks. Every money-changing call takes an idempotency
key: a replay returns the first result, the same key with other parameters raises
IdempotencyConflict.

On SQLite the engine must let SQLAlchemy emit BEGIN (pysqlite's legacy transaction mode
turns a SAVEPOINT outside a transaction into an autocommit): set `isolation_level = None`
on each DBAPI connection and emit `BEGIN IMMEDIATE` from the engine's "begin" event, as
coordinator/db.py does.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import asdict
from datetime import datetime
from typing import Any, Iterable

from sqlalchemy import delete, update
from sqlalchemy import select as core_select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm.util import identity_key
from sqlmodel import Session, col, select

from pricing.errors import (
    HoldExceeded, HoldNotPending, IdempotencyConflict, InsufficientFunds, LedgerError, RetryableConflict,
    UnknownAccount, WrongAccountKind,
)
from pricing.ledger_models import (  # noqa: F401  (re-exported: the ledger's public names)
    MAY_GO_NEGATIVE, SHARDED_KINDS, SYSTEM_KINDS, SYSTEM_SHARDS, AccountKind, HoldState, LedgerAccount, LedgerHold,
    LedgerIdempotency, LedgerTransfer, SettleResult, _utcnow,
)
from pricing.money import fee_of


def _hash(params: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()


_SYSTEM_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> {(kind, shard): id}


class Ledger:
    def __init__(self, session: Session):
        self.s = session

    # ------------------------------------------------------------------ accounts
    def open_account(self, kind: AccountKind, ref: str) -> LedgerAccount:
        """The account of `kind` for `ref`, created on first use."""
        row = self.s.exec(select(LedgerAccount).where(LedgerAccount.kind == kind, LedgerAccount.ref == ref)).first()
        if row is not None:
            return row
        row = LedgerAccount(kind=kind, ref=ref)
        try:
            with self.s.begin_nested():
                self.s.add(row)
        except IntegrityError:  # created concurrently
            row = self.s.exec(
                select(LedgerAccount).where(LedgerAccount.kind == kind, LedgerAccount.ref == ref)).first()
            if row is None:  # committed after this transaction's snapshot
                raise RetryableConflict(f"account {kind.value}:{ref} was created concurrently; retry") from None
        else:
            self.s.info.setdefault("ledger_created", set()).add(row.id)
        return row

    def system(self, kind: AccountKind, shard: int = 0) -> LedgerAccount:
        """A system account. ESCROW and PLATFORM_FEES, touched by every request, are split
        into SYSTEM_SHARDS rows (refs `escrow`, `escrow:1`, ...; a buyer's holds use shard
        buyer id % SYSTEM_SHARDS) so that concurrent requests of different buyers do not
        queue on one hot row lock; shard 0 has the plain ref. EXTERNAL is one row.
        `system_balance(kind)` is the total over the shards."""
        if kind not in SYSTEM_KINDS:
            raise LedgerError(f"{kind} is not a system account")
        shard %= SYSTEM_SHARDS
        return self.open_account(kind, ref=kind.value if shard == 0 else f"{kind.value}:{shard}")

    def _sys(self, kind: AccountKind, key: int, cache: dict | None = None) -> int:
        """Id of the shard of system account `kind` that serves `key` (an account id).
        `cache` is for one call only: a shard created in a savepoint that later rolls back
        must not be remembered. Across calls, ids of shards that existed before this
        transaction are remembered per database engine (`_SYSTEM_IDS`): system accounts are
        never deleted, so the id cannot go stale."""
        k = (kind, key % SYSTEM_SHARDS if kind in SHARDED_KINDS else 0)
        if cache is not None and k in cache:
            return cache[k]
        known = _SYSTEM_IDS.setdefault(self.s.get_bind(), {})
        if k in known:
            return known[k]
        acct_id = self.system(kind, k[1]).id
        if acct_id not in self.s.info.get("ledger_created", ()):
            known[k] = acct_id
        if cache is not None:
            cache[k] = acct_id
        return acct_id

    def system_balance(self, kind: AccountKind) -> int:
        """The balance of a system account: the sum over its shards."""
        from sqlalchemy import func

        return int(self.s.exec(select(func.coalesce(func.sum(LedgerAccount.balance), 0))
                               .where(LedgerAccount.kind == kind)).one())

    def balance(self, account_id: int) -> int:
        acct = self.s.get(LedgerAccount, account_id)
        if acct is None:
            raise UnknownAccount(f"no ledger account {account_id}")
        self.s.refresh(acct)
        return acct.balance

    def held(self, buyer_account_id: int) -> int:
        """The total of the buyer's pending holds (money in escrow, not yet settled)."""
        from sqlalchemy import func

        return int(self.s.exec(select(func.coalesce(func.sum(LedgerHold.amount), 0)).where(
            LedgerHold.buyer_account_id == buyer_account_id, LedgerHold.state == HoldState.PENDING)).one())

    def _lock(self, ids: Iterable[int]) -> dict[int, LedgerAccount]:
        ids = sorted(set(ids))
        rows = self.s.exec(
            select(LedgerAccount).where(LedgerAccount.id.in_(ids))  # type: ignore[union-attr]
            .order_by(LedgerAccount.id).with_for_update().execution_options(populate_existing=True)
        ).all()
        found = {r.id: r for r in rows}
        missing = set(ids) - set(found)
        if missing:
            raise UnknownAccount(f"no ledger account(s) {sorted(missing)}")
        return found

    def _move(self, accts: dict[int, LedgerAccount], debit: int, credit: int, amount: int, kind: str,
              hold_id: int | None = None, request_ref: str | None = None) -> None:
        if amount < 0 or not isinstance(amount, int):
            raise LedgerError(f"transfer amount must be a non-negative int, got {amount!r}")
        if amount == 0:
            return
        d, c = accts[debit], accts[credit]
        if d.kind not in MAY_GO_NEGATIVE and d.balance < amount:
            raise InsufficientFunds(d.balance, amount)
        d.balance -= amount
        c.balance += amount
        self.s.add(d)
        self.s.add(c)
        self.s.add(LedgerTransfer(debit_account_id=debit, credit_account_id=credit, amount=amount, kind=kind,
                                  hold_id=hold_id, request_ref=request_ref))

    # ------------------------------------------------------------------ idempotency
    def _once(self, key: str, op: str, params: dict[str, Any], fn) -> dict[str, Any]:
        """Run `fn()` once per key; replays return the stored result. The key is claimed
        and `fn` run in one savepoint: if `fn` fails, the claim goes with it (a corrected
        retry can use the key); if the key is taken, nothing of `fn` ran."""
        if not key:
            raise LedgerError("an idempotency key is required")
        h = _hash({"op": op, **params})
        self.s.flush()  # the caller's pending rows: their errors are theirs, not a taken key
        prior = self.s.identity_map.get(identity_key(LedgerIdempotency, key))  # replayed in this session
        if prior is not None:
            return self._replayed(prior, key, h)
        claim = LedgerIdempotency(key=key, op=op, params_hash=h)
        claimed = False
        try:
            with self.s.begin_nested():
                self.s.add(claim)
                self.s.flush()
                claimed = True
                result = fn()
                claim.result = result
                self.s.add(claim)
        except IntegrityError:
            if claimed:  # fn's own error
                raise
            prior = self.s.get(LedgerIdempotency, key, populate_existing=True)
            if prior is None:  # committed after this transaction's snapshot
                raise RetryableConflict(f"idempotency key {key!r} was used concurrently; retry") from None
            return self._replayed(prior, key, h)
        return result

    @staticmethod
    def _replayed(prior: LedgerIdempotency, key: str, h: str) -> dict[str, Any]:
        if prior.params_hash != h:
            raise IdempotencyConflict(f"idempotency key {key!r} was used for a different {prior.op}")
        return prior.result

    # ------------------------------------------------------------------ operations
    def deposit(self, account_id: int, amount: int, *, idempotency_key: str) -> int:
        """EXTERNAL -> account. Returns the account's balance after the first call."""
        if amount <= 0:
            raise LedgerError("deposit amount must be positive")

        def op():
            ext = self._sys(AccountKind.EXTERNAL, account_id)
            accts = self._lock([ext, account_id])
            self._move(accts, ext, account_id, amount, "deposit")
            return {"balance": accts[account_id].balance}

        return self._once(idempotency_key, "deposit", {"account": account_id, "amount": amount}, op)["balance"]

    def charge(self, buyer_account_id: int, amount: int, *, kind: str, idempotency_key: str,
               request_ref: str | None = None) -> int:
        """Buyer -> the platform's fees at once, no hold: a price known before the answer is
        given (e.g. a cached answer's, `kind` "cache"). Returns the buyer's balance after the
        first call; InsufficientFunds if it is short."""
        if amount <= 0:
            raise LedgerError("charge amount must be positive")

        def op():
            platform = self._sys(AccountKind.PLATFORM_FEES, buyer_account_id)
            accts = self._lock([platform, buyer_account_id])
            if accts[buyer_account_id].kind != AccountKind.BUYER:
                raise WrongAccountKind("charges are made to buyer accounts")
            self._move(accts, buyer_account_id, platform, amount, kind, request_ref=request_ref)
            return {"balance": accts[buyer_account_id].balance}

        params = {"buyer": buyer_account_id, "amount": amount, "kind": kind, "ref": request_ref}
        return self._once(idempotency_key, "charge", params, op)["balance"]

    def create_hold(self, buyer_account_id: int, amount: int, *, idempotency_key: str,
                    request_ref: str | None = None, expires_at: datetime | None = None) -> LedgerHold:
        if amount < 0:
            raise LedgerError("hold amount must be >= 0")

        def op():
            escrow = self._sys(AccountKind.ESCROW, buyer_account_id)
            accts = self._lock([escrow, buyer_account_id])
            if accts[buyer_account_id].kind != AccountKind.BUYER:
                raise WrongAccountKind("holds are placed on buyer accounts")
            if accts[buyer_account_id].balance < amount:
                raise InsufficientFunds(accts[buyer_account_id].balance, amount)
            hold = LedgerHold(buyer_account_id=buyer_account_id, amount=amount, request_ref=request_ref,
                              expires_at=expires_at)
            self.s.add(hold)
            self.s.flush()
            self._move(accts, buyer_account_id, escrow, amount, "hold", hold.id, request_ref)
            return {"hold_id": hold.id}

        result = self._once(idempotency_key, "hold", {"buyer": buyer_account_id, "amount": amount,
                                                      "ref": request_ref}, op)
        return self.s.get(LedgerHold, result["hold_id"])

    def hold_for_new_request(self, buyer_account_id: int, amount: int, request_ref: str,
                             expires_at: datetime | None = None) -> int:
        """`create_hold` for a request admitted in this same transaction, in four statements
        instead of about ten (it is on every buyer's path to the first token): the buyer's
        balance is checked and moved by one conditional UPDATE, escrow credited, the hold
        and its transfer inserted. No idempotency row: the caller's request row, inserted
        in this transaction under a fresh unique id, makes a second hold for it impossible
        (a retried transaction starts over, and a replayed request finds its row). Rows are
        updated in id order, like `_lock`, so it never deadlocks with a settlement.
        Returns the hold's id."""
        if amount < 0 or not isinstance(amount, int):
            raise LedgerError(f"hold amount must be a non-negative int, got {amount!r}")
        escrow = self._sys(AccountKind.ESCROW, buyer_account_id)
        accounts = LedgerAccount.__table__
        self.s.flush()  # the caller's pending rows first: their errors are theirs
        conn = self.s.connection()
        debit = update(accounts).where(accounts.c.id == buyer_account_id, accounts.c.kind == AccountKind.BUYER,
                                       accounts.c.balance >= amount).values(balance=accounts.c.balance - amount)
        credit = update(accounts).where(accounts.c.id == escrow).values(balance=accounts.c.balance + amount)
        for acct_id, stmt in sorted(((buyer_account_id, debit), (escrow, credit)), key=lambda x: x[0]):
            if conn.execute(stmt).rowcount != 1 and acct_id == buyer_account_id:
                row = conn.execute(core_select(accounts.c.kind, accounts.c.balance)
                                   .where(accounts.c.id == buyer_account_id)).first()
                if row is None:
                    raise UnknownAccount(f"no ledger account(s) [{buyer_account_id}]")
                raise WrongAccountKind("holds are placed on buyer accounts") if row.kind != AccountKind.BUYER \
                    else InsufficientFunds(int(row.balance), amount)
        now = _utcnow()
        hold_id = conn.execute(LedgerHold.__table__.insert().values(
            buyer_account_id=buyer_account_id, amount=amount, state=HoldState.PENDING, request_ref=request_ref,
            expires_at=expires_at, created_at=now, posted_amount=0).returning(LedgerHold.__table__.c.id)).scalar_one()
        if amount:
            conn.execute(LedgerTransfer.__table__.insert().values(
                debit_account_id=buyer_account_id, credit_account_id=escrow, amount=amount, kind="hold",
                hold_id=hold_id, request_ref=request_ref, created_at=now))
        for cached in (self.s.identity_map.get(identity_key(LedgerAccount, a)) for a in (buyer_account_id, escrow)):
            if cached is not None:  # an ORM copy loaded earlier in this session is stale now
                self.s.expire(cached, ["balance"])
        return hold_id

    def _pending_hold(self, hold_id: int) -> LedgerHold:
        hold = self.s.get(LedgerHold, hold_id, with_for_update=True, populate_existing=True)
        if hold is None:
            raise LedgerError(f"no hold {hold_id}")
        if hold.state != HoldState.PENDING:
            raise HoldNotPending(f"hold {hold_id} is already {hold.state.value}")
        return hold

    def settle_hold(self, hold_id: int, parts: list[tuple[int, int]], fee_bps: int, *,
                    idempotency_key: str) -> SettleResult:
        """Post `parts` [(seller account, gross)] out of the hold; the rest goes back."""
        parts = [(int(a), int(g)) for a, g in parts]
        if any(g < 0 for _, g in parts):
            raise LedgerError("settlement amounts must be >= 0")

        def op():
            hold = self._pending_hold(hold_id)
            gross = sum(g for _, g in parts)
            if gross > hold.amount:
                raise HoldExceeded(f"settlement {gross} exceeds hold {hold.amount}")
            escrow = self._sys(AccountKind.ESCROW, hold.buyer_account_id)
            platform = self._sys(AccountKind.PLATFORM_FEES, hold.buyer_account_id)
            accts = self._lock([escrow, platform, hold.buyer_account_id, *(a for a, _ in parts)])
            if any(accts[a].kind != AccountKind.SELLER_EARNINGS for a, _ in parts):
                raise WrongAccountKind("settlement parts are paid to seller earnings accounts")
            fee_total = 0
            for account, g in parts:
                fee = fee_of(g, fee_bps)
                fee_total += fee
                self._move(accts, escrow, account, g - fee, "earning", hold.id, hold.request_ref)
                self._move(accts, escrow, platform, fee, "fee", hold.id, hold.request_ref)
            refund = hold.amount - gross
            self._move(accts, escrow, hold.buyer_account_id, refund, "release", hold.id, hold.request_ref)
            hold.state, hold.posted_amount, hold.resolved_at = HoldState.POSTED, gross, _utcnow()
            self.s.add(hold)
            return asdict(SettleResult(hold.id, gross, fee_total, refund))

        result = self._once(idempotency_key, "settle", {"hold": hold_id, "parts": parts, "fee_bps": fee_bps}, op)
        return SettleResult(**result)

    def void_hold(self, hold_id: int, *, idempotency_key: str) -> SettleResult:
        def op():
            hold = self._pending_hold(hold_id)
            escrow = self._sys(AccountKind.ESCROW, hold.buyer_account_id)
            accts = self._lock([escrow, hold.buyer_account_id])
            self._move(accts, escrow, hold.buyer_account_id, hold.amount, "void", hold.id, hold.request_ref)
            hold.state, hold.resolved_at = HoldState.VOIDED, _utcnow()
            self.s.add(hold)
            return asdict(SettleResult(hold.id, 0, 0, hold.amount))

        return SettleResult(**self._once(idempotency_key, "void", {"hold": hold_id}, op))

    def payout(self, earnings_account_id: int, amount: int, *, idempotency_key: str,
               destination_ref: str | None = None) -> int:
        """Seller earnings -> EXTERNAL (money leaves the platform). Returns the earnings
        balance after the first call; replays return the same number."""
        if amount <= 0:
            raise LedgerError("payout amount must be positive")

        def op():
            ext = self._sys(AccountKind.EXTERNAL, earnings_account_id)
            accts = self._lock([ext, earnings_account_id])
            if accts[earnings_account_id].kind != AccountKind.SELLER_EARNINGS:
                raise WrongAccountKind("payouts are made from seller earnings accounts")
            self._move(accts, earnings_account_id, ext, amount, "payout", request_ref=destination_ref)
            return {"balance": accts[earnings_account_id].balance}

        params = {"account": earnings_account_id, "amount": amount, "dest": destination_ref}
        return self._once(idempotency_key, "payout", params, op)["balance"]

    def clawback(self, earnings_account_id: int, buyer_account_id: int, amount: int, *, idempotency_key: str,
                 request_ref: str | None = None) -> int:
        """Seller earnings -> buyer (a failed audit inside the challenge window). Never more
        than the earnings hold; returns the earnings balance after the first call."""
        if amount <= 0:
            raise LedgerError("clawback amount must be positive")

        def op():
            accts = self._lock([earnings_account_id, buyer_account_id])
            if accts[earnings_account_id].kind != AccountKind.SELLER_EARNINGS:
                raise WrongAccountKind("claw-backs come from seller earnings accounts")
            if accts[buyer_account_id].kind != AccountKind.BUYER:
                raise WrongAccountKind("claw-backs go to buyer accounts")
            self._move(accts, earnings_account_id, buyer_account_id, amount, "clawback", request_ref=request_ref)
            return {"balance": accts[earnings_account_id].balance}

        params = {"from": earnings_account_id, "to": buyer_account_id, "amount": amount, "ref": request_ref}
        return self._once(idempotency_key, "clawback", params, op)["balance"]

    def refund_fee(self, buyer_account_id: int, amount: int, *, idempotency_key: str,
                   request_ref: str | None = None) -> int:
        """The platform pays a buyer back what a fraudulent job cost it beyond what the seller's
        earnings and stake could cover (the platform's own fee on it, at most): from the fees
        it holds (any shard), the rest from EXTERNAL (the operator's money). Returns the amount."""
        return self._platform_covers(buyer_account_id, AccountKind.BUYER, amount, "fee_refund",
                                     idempotency_key=idempotency_key, request_ref=request_ref)

    def pay_from_platform(self, account_id: int, amount: int, *, idempotency_key: str, kind: str = "verify",
                          request_ref: str | None = None) -> int:
        """PLATFORM_FEES -> a seller's earnings (e.g. a verifier's fee for an audit), at most
        what the platform holds. Returns the amount paid by the first call."""
        if amount < 0:
            raise LedgerError("amount must be >= 0")

        def op():
            shards = self.s.exec(select(LedgerAccount.id).where(
                LedgerAccount.kind == AccountKind.PLATFORM_FEES)).all()  # fees land on every shard
            accts = self._lock([*shards, account_id])
            if accts[account_id].kind != AccountKind.SELLER_EARNINGS:
                raise WrongAccountKind("platform payments go to seller earnings accounts")
            paid = 0
            for shard in sorted(shards, key=lambda i: -accts[i].balance):
                take = min(amount - paid, accts[shard].balance)
                if take <= 0:
                    break
                self._move(accts, shard, account_id, take, kind, request_ref=request_ref)
                paid += take
            return {"paid": paid}

        params = {"to": account_id, "amount": amount, "kind": kind, "ref": request_ref}
        return self._once(idempotency_key, "platform_pay", params, op)["paid"]


    def compensate(self, earnings_account_id: int, amount: int, *, idempotency_key: str,
                   request_ref: str | None = None) -> int:
        """The platform makes a seller whole for a penalty that an appeal overturned (what was
        clawed back and slashed, the pay for a job voided by the wrong verdict): from the fees
        it holds, the rest from EXTERNAL (the operator's money). Returns the amount."""
        return self._platform_covers(earnings_account_id, AccountKind.SELLER_EARNINGS, amount, "compensation",
                                     idempotency_key=idempotency_key, request_ref=request_ref)

    def _platform_covers(self, account_id: int, account_kind: AccountKind, amount: int, kind: str, *,
                         idempotency_key: str, request_ref: str | None) -> int:
        """PLATFORM_FEES (richest shard first), then EXTERNAL -> `account_id`, all of `amount`."""
        if amount < 0:
            raise LedgerError("amount must be >= 0")

        def op():
            shards = self.s.exec(select(LedgerAccount.id).where(LedgerAccount.kind == AccountKind.PLATFORM_FEES)).all()
            external = self._sys(AccountKind.EXTERNAL, 0)
            accts = self._lock([*shards, external, account_id])
            if accts[account_id].kind != account_kind:
                raise WrongAccountKind(f"{kind} goes to {account_kind.value} accounts")
            left = amount
            for shard in sorted(shards, key=lambda i: -accts[i].balance):
                take = min(left, accts[shard].balance)
                if take <= 0:
                    break
                self._move(accts, shard, account_id, take, kind, request_ref=request_ref)
                left -= take
            self._move(accts, external, account_id, left, kind, request_ref=request_ref)
            return {"refunded": amount}

        params = {"to": account_id, "amount": amount, "ref": request_ref}
        return self._once(idempotency_key, kind, params, op)["refunded"]


def expire_holds(session: Session, now: datetime | None = None, *, limit: int | None = None) -> list[int]:
    """Void every pending hold whose `expires_at` is before `now` (at most `limit` of them);
    returns their ids.

    The due holds are locked first, in id order, skipping any that another transaction has
    locked (it is settling or voiding them; a later sweep picks up the ones it leaves), so
    the sweep takes hold locks before account locks like every other path, and takes all
    its account locks in one round, in id order: it cannot deadlock with concurrent
    settlements. Run it in a transaction of its own (account locks taken earlier in the
    same transaction break the order), with `limit` to keep that transaction short.
    Idempotent (key `expire:<hold id>`)."""
    now = now or _utcnow()
    q = (select(LedgerHold.id, LedgerHold.buyer_account_id).where(
        LedgerHold.state == HoldState.PENDING, LedgerHold.expires_at.is_not(None),  # type: ignore[union-attr]
        LedgerHold.expires_at < now).order_by(LedgerHold.id).with_for_update(skip_locked=True))
    due = session.exec(q.limit(limit) if limit is not None else q).all()
    ledger, voided, shards = Ledger(session), [], {}
    if due:  # every account the voids touch, locked in one round in id order
        buyers = {b for _, b in due}
        ledger._lock([*buyers, *(ledger._sys(AccountKind.ESCROW, b, shards) for b in buyers)])
    for hid, _ in due:
        try:
            ledger.void_hold(hid, idempotency_key=f"expire:{hid}")
        except HoldNotPending:
            continue
        voided.append(hid)
    return voided


def prune_idempotency(session: Session, older_than: datetime, *, limit: int = 5000) -> int:
    """Forget up to `limit` idempotency keys created before `older_than`; returns how many.

    A replay of a forgotten key runs its operation again, so the retention must outlast any
    client's retry horizon (the coordinator keeps keys `idempotency_retention_s`, 30 days by
    default). The coordinator's own keys are safe to forget once their request has ended:
    a second settle, void or expiry of a resolved hold is refused (HoldNotPending)."""
    keys = select(LedgerIdempotency.key).where(col(LedgerIdempotency.created_at) < older_than)
    doomed = list(session.exec(keys.order_by(col(LedgerIdempotency.created_at)).limit(limit)).all())
    if doomed:
        session.execute(delete(LedgerIdempotency).where(col(LedgerIdempotency.key).in_(doomed)))
    return len(doomed)


def total_balance(session: Session) -> int:
    """The sum of every balance: zero, always."""
    from sqlalchemy import func

    return int(session.exec(select(func.coalesce(func.sum(LedgerAccount.balance), 0))).one())
