"""Seller stake: bonding, a minimum per model, slashing, and withdrawal after unbonding.

A seller's stake lives in a SELLER_STAKE account. Withdrawing is two steps: `request_unbond`
records the amount and when it matures (now + the unbonding delay); the money stays in the
stake account, so misbehaviour found during the delay can still be slashed. Once matured,
`withdraw_matured` pays each request out to EXTERNAL, capped at what the account still holds
after any slashes. `bonded` is the balance less pending unbonding requests: the stake that
counts towards a model's minimum.

Slashing moves stake to the harmed buyers and the rest of the slashed amount to the platform.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, select

from pricing.errors import InsufficientFunds, LedgerError, WrongAccountKind
from pricing.ledger import Ledger
from pricing.ledger_models import AccountKind, LedgerUnbonding, UnbondingState, _utcnow

DEFAULT_UNBONDING = timedelta(days=7)


@dataclass(frozen=True)
class StakePolicy:
    """Minimum bonded stake (nano-USD) to sell a model; `per_model` overrides `default_min`."""

    default_min: int = 0
    per_model: dict[str, int] = field(default_factory=dict)
    unbonding_delay: timedelta = DEFAULT_UNBONDING

    def minimum(self, model: str) -> int:
        return self.per_model.get(model, self.default_min)


@dataclass(frozen=True)
class SlashResult:
    slashed: int
    to_buyers: int
    to_platform: int


class Stake:
    """Stake operations on top of a `Ledger` (same session, same transaction rules)."""

    def __init__(self, ledger: Ledger, policy: StakePolicy | None = None):
        self.ledger, self.s = ledger, ledger.s
        self.policy = policy or StakePolicy()

    def _stake_account(self, account_id: int):
        accts = self.ledger._lock([account_id])
        if accts[account_id].kind != AccountKind.SELLER_STAKE:
            raise WrongAccountKind(f"account {account_id} is not a stake account")
        return accts[account_id]

    def deposit(self, stake_account_id: int, amount: int, *, idempotency_key: str) -> int:
        """EXTERNAL -> stake. Returns the stake balance after the first call."""
        self._stake_account(stake_account_id)
        return self.ledger.deposit(stake_account_id, amount, idempotency_key=idempotency_key)

    def unbonding(self, stake_account_id: int) -> int:
        return int(self.s.exec(select(func.coalesce(func.sum(LedgerUnbonding.amount), 0)).where(
            LedgerUnbonding.stake_account_id == stake_account_id,
            LedgerUnbonding.state == UnbondingState.PENDING)).one())

    def bonded(self, stake_account_id: int) -> int:
        return max(0, self.ledger.balance(stake_account_id) - self.unbonding(stake_account_id))

    def may_sell(self, stake_account_id: int, model: str) -> bool:
        return self.bonded(stake_account_id) >= self.policy.minimum(model)

    def request_unbond(self, stake_account_id: int, amount: int, *, idempotency_key: str,
                       now: datetime | None = None) -> LedgerUnbonding:
        """Start withdrawing `amount` of bonded stake; it matures after the unbonding delay."""
        if amount <= 0:
            raise LedgerError("unbonding amount must be positive")
        now = now or _utcnow()

        def op():
            acct = self._stake_account(stake_account_id)  # locked: serialises requests
            free = acct.balance - self.unbonding(stake_account_id)
            if free < amount:
                raise InsufficientFunds(max(free, 0), amount)
            row = LedgerUnbonding(stake_account_id=stake_account_id, amount=amount, requested_at=now,
                                  matures_at=now + self.policy.unbonding_delay)
            self.s.add(row)
            self.s.flush()
            return {"unbonding_id": row.id}

        result = self.ledger._once(idempotency_key, "unbond", {"account": stake_account_id, "amount": amount}, op)
        return self.s.get(LedgerUnbonding, result["unbonding_id"])

    def slash(self, stake_account_id: int, amount: int, *, to: list[tuple[int, int]] = (),
              idempotency_key: str, reason: str | None = None, allow_partial: bool = False) -> SlashResult:
        """Take `amount` from the stake: each buyer account in `to` [(account, x)] gets x,
        the platform the rest. Stake that is unbonding (requested, not yet withdrawn) is
        still in the account and is taken like any other.

        If the stake holds less than `amount`: raises InsufficientFunds, or with
        `allow_partial` takes what there is, paying the buyers first, in order."""
        to = [(int(a), int(x)) for a, x in to]
        if not isinstance(amount, int) or amount <= 0 or any(x < 0 for _, x in to):
            raise LedgerError("slash amounts must be positive ints")
        if sum(x for _, x in to) > amount:
            raise LedgerError(f"compensation {sum(x for _, x in to)} exceeds the slashed {amount}")

        def op():
            platform = self.ledger._sys(AccountKind.PLATFORM_FEES, stake_account_id)
            accts = self.ledger._lock([stake_account_id, platform, *(a for a, _ in to)])
            if accts[stake_account_id].kind != AccountKind.SELLER_STAKE:
                raise WrongAccountKind(f"account {stake_account_id} is not a stake account")
            if any(accts[a].kind != AccountKind.BUYER for a, _ in to):
                raise WrongAccountKind("slashed stake compensates buyer accounts")
            left = accts[stake_account_id].balance
            if left < amount and not allow_partial:
                raise InsufficientFunds(left, amount)
            taken = min(amount, left)
            to_buyers = 0
            for account, x in to:
                x = min(x, taken - to_buyers)
                self.ledger._move(accts, stake_account_id, account, x, "slash", request_ref=reason)
                to_buyers += x
            self.ledger._move(accts, stake_account_id, platform, taken - to_buyers, "slash", request_ref=reason)
            return {"slashed": taken, "to_buyers": to_buyers, "to_platform": taken - to_buyers}

        params = {"account": stake_account_id, "amount": amount, "to": to, "reason": reason}
        if allow_partial:  # only then, so keys stored before the option existed still replay
            params["partial"] = True
        return SlashResult(**self.ledger._once(idempotency_key, "slash", params, op))


def withdraw_matured(session: Session, now: datetime | None = None) -> list[tuple[int, int]]:
    """Pay out every pending unbonding request matured by `now` (stake -> EXTERNAL).

    Returns [(unbonding id, amount paid)]; the amount is capped at the stake left after
    slashes. Each request is paid at most once (its row is locked and marked WITHDRAWN in
    the same transaction as the transfer); safe to run from a periodic task."""
    now = now or _utcnow()
    ledger = Ledger(session)
    ids = session.exec(select(LedgerUnbonding.id).where(
        LedgerUnbonding.state == UnbondingState.PENDING, LedgerUnbonding.matures_at <= now)
        .order_by(LedgerUnbonding.id)).all()
    paid = []
    for uid in ids:
        row = session.get(LedgerUnbonding, uid, with_for_update=True, populate_existing=True)
        if row is None or row.state != UnbondingState.PENDING:
            continue
        ext = ledger._sys(AccountKind.EXTERNAL, row.stake_account_id)
        accts = ledger._lock([ext, row.stake_account_id])
        amount = min(row.amount, max(accts[row.stake_account_id].balance, 0))
        ledger._move(accts, row.stake_account_id, ext, amount, "unbond", request_ref=f"unbond:{uid}")
        row.state, row.withdrawn_amount, row.resolved_at = UnbondingState.WITHDRAWN, amount, now
        session.add(row)
        paid.append((uid, amount))
    session.flush()
    return paid




def bonded_by_ref(session: Session, refs: list[str]) -> dict[str, int]:
    """Bonded stake of many stake accounts at once, by account ref (e.g. "node:<id>"): two
    grouped queries whatever the number of refs; a ref without an account has 0."""
    from pricing.ledger_models import LedgerAccount

    if not refs:
        return {}
    rows = session.exec(select(LedgerAccount.id, LedgerAccount.ref, LedgerAccount.balance).where(
        LedgerAccount.kind == AccountKind.SELLER_STAKE, LedgerAccount.ref.in_(refs))).all()  # type: ignore[union-attr]
    ids = {acct_id: ref for acct_id, ref, _ in rows}
    pending = dict(session.exec(select(LedgerUnbonding.stake_account_id, func.sum(LedgerUnbonding.amount)).where(
        LedgerUnbonding.stake_account_id.in_(list(ids)),  # type: ignore[attr-defined]
        LedgerUnbonding.state == UnbondingState.PENDING).group_by(LedgerUnbonding.stake_account_id)).all()) if ids else {}
    out = dict.fromkeys(refs, 0)
    for acct_id, ref, balance in rows:
        out[ref] = max(0, balance - int(pending.get(acct_id) or 0))
    return out
