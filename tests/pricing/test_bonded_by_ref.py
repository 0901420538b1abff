"""Bonded stake of many nodes in one go equals the per-account figure."""

from __future__ import annotations

from pricing.ledger import AccountKind, Ledger
from pricing.stake import Stake, bonded_by_ref


def test_bonded_by_ref_matches_each_account(session):
    led = Ledger(session)
    stake = Stake(led)
    a = led.open_account(AccountKind.SELLER_STAKE, ref="node:a").id
    b = led.open_account(AccountKind.SELLER_STAKE, ref="node:b").id
    stake.deposit(a, 1_000, idempotency_key="a")
    stake.deposit(b, 500, idempotency_key="b")
    stake.request_unbond(a, 300, idempotency_key="ua")
    got = bonded_by_ref(session, ["node:a", "node:b", "node:none"])
    assert got == {"node:a": stake.bonded(a), "node:b": stake.bonded(b), "node:none": 0} == \
        {"node:a": 700, "node:b": 500, "node:none": 0}
    assert bonded_by_ref(session, []) == {}
