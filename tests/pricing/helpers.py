"""Helpers shared by the ledger tests."""

from __future__ import annotations

from sqlmodel import Session

from pricing.ledger import Ledger


def in_tx(engine, fn):
    """Run `fn(Ledger(session))` in its own committed transaction; return its result."""
    with Session(engine, expire_on_commit=False) as s:
        out = fn(Ledger(s))
        s.commit()
        return out
