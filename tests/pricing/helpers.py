"""Helpers shared by the ledger tests."""

from __future__ import annotations

from sqlmodel import Session

from pricing.ledger import Ledger
from pricing.stake import Stake


def in_tx(engine, fn):
    """Run `fn(Ledger(session))` in its own committed transaction; return its result."""
    with Session(engine, expire_on_commit=False) as s:
        out = fn(Ledger(s))
        s.commit()
        return out


# Stake operations on one session, as the tests use them.
def deposit_stake(s, acct, amount, **kw):
    return Stake(Ledger(s)).deposit(acct, amount, **kw)


def has_min_stake(s, acct, model, policy=None):
    return Stake(Ledger(s), policy).may_sell(acct, model)


def bonded_stake(s, acct):
    return Stake(Ledger(s)).bonded(acct)


def request_unbond(s, acct, amount, *, policy=None, **kw):
    return Stake(Ledger(s), policy).request_unbond(acct, amount, **kw)


def slash(s, acct, amount, *, refunds=(), **kw):
    return Stake(Ledger(s)).slash(acct, amount, to=refunds, **kw)
