"""Seller payouts: earnings leave the platform (SELLER_EARNINGS -> EXTERNAL) on request.

A payout is one transfer, made under a row lock on the earnings account after checking
the balance, so it is never more than the seller has earned and never drives the account
negative, whatever runs concurrently. `amount=None` pays out the whole balance at the
time of the first call.

Idempotent like every money-changing call: the same key returns the first answer (even
if the balance has changed since), the same key with other parameters raises
IdempotencyConflict. The keys and stored results are those of `Ledger.payout`, so a
request retried through either entry point is paid once.

`earnings` summarises an earnings account for a seller's dashboard: balance, total
earned, total paid out.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func
from sqlmodel import Session, select

from pricing.errors import InsufficientFunds, LedgerError, UnknownAccount, WrongAccountKind
from pricing.ledger import Ledger
from pricing.ledger_models import AccountKind, LedgerAccount, LedgerTransfer


@dataclass(frozen=True)
class PayoutResult:
    account_id: int
    amount: int   # paid out by this request (0 only for amount=None on an empty account)
    balance: int  # the earnings balance right after the payout


@dataclass(frozen=True)
class Earnings:
    account_id: int
    balance: int
    earned: int      # credited from settlements, after fees
    paid_out: int    # sent to the seller
    other_in: int    # any other credit (e.g. a manual adjustment)
    other_out: int   # any other debit


def request_payout(session: Session, earnings_account_id: int, amount: int | None = None, *,
                   idempotency_key: str, destination_ref: str | None = None,
                   minimum: int = 1) -> PayoutResult:
    """Pay `amount` (or everything, if None) from a seller's earnings to EXTERNAL.

    Raises InsufficientFunds if the earnings are short of `amount` (or, with amount=None,
    short of `minimum`), WrongAccountKind for any other kind of account."""
    if amount is not None and (not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0):
        raise LedgerError("payout amount must be a positive int")
    if amount is not None and amount < minimum:
        raise LedgerError(f"payout amount {amount} is below the minimum {minimum}")
    led = Ledger(session)

    def op():
        ext = led.system(AccountKind.EXTERNAL)
        accts = led._lock([ext.id, earnings_account_id])
        acct = accts[earnings_account_id]
        if acct.kind != AccountKind.SELLER_EARNINGS:
            raise WrongAccountKind("payouts are made from seller earnings accounts")
        pay = acct.balance if amount is None else amount
        if pay < minimum or acct.balance < pay:
            raise InsufficientFunds(acct.balance, max(pay, minimum))
        led._move(accts, earnings_account_id, ext.id, pay, "payout", request_ref=destination_ref)
        return {"balance": acct.balance, "amount": pay}

    # the same op and parameters as Ledger.payout, so both entry points share keys
    params = {"account": earnings_account_id, "amount": "all" if amount is None else amount,
              "dest": destination_ref}
    result = led._once(idempotency_key, "payout", params, op)
    return PayoutResult(earnings_account_id, int(result.get("amount", amount or 0)), int(result["balance"]))


def earnings(session: Session, earnings_account_id: int) -> Earnings:
    """Totals of an earnings account, from its transfers (the balance is the kept one)."""
    acct = session.get(LedgerAccount, earnings_account_id)
    if acct is None:
        raise UnknownAccount(f"no ledger account {earnings_account_id}")
    if acct.kind != AccountKind.SELLER_EARNINGS:
        raise WrongAccountKind(f"account {earnings_account_id} is not an earnings account")
    session.refresh(acct)
    T = LedgerTransfer
    credits = dict(session.exec(select(T.kind, func.sum(T.amount)).where(
        T.credit_account_id == earnings_account_id).group_by(T.kind)).all())
    debits = dict(session.exec(select(T.kind, func.sum(T.amount)).where(
        T.debit_account_id == earnings_account_id).group_by(T.kind)).all())
    earned = int(credits.pop("earning", 0) or 0)
    paid = int(debits.pop("payout", 0) or 0)
    return Earnings(earnings_account_id, acct.balance, earned, paid,
                    int(sum(v or 0 for v in credits.values())), int(sum(v or 0 for v in debits.values())))
