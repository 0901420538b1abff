"""Per-request cost from the ledger: held, charged, refunded, fee and each seller's share."""

from __future__ import annotations

from pricing.ledger import AccountKind, Ledger
from pricing.money import fee_of
from pricing.statement import request_charges


def test_charges_of_a_failover_request_and_of_a_voided_one(session):
    led = Ledger(session)
    buyer = led.open_account(AccountKind.BUYER, ref="b").id
    s1, s2 = (led.open_account(AccountKind.SELLER_EARNINGS, ref=f"s{i}").id for i in range(2))
    led.deposit(buyer, 10_000, idempotency_key="d")
    h = led.create_hold(buyer, 5_000, idempotency_key="h1", request_ref="req_1")
    assert request_charges(session, "req_1").pending
    led.settle_hold(h.id, [(s1, 1_999), (s2, 1_001)], 500, idempotency_key="s1")
    c = request_charges(session, "req_1")
    assert (c.held, c.charged, c.refunded, c.pending) == (5_000, 3_000, 2_000, False)
    assert c.fees == fee_of(1_999, 500) + fee_of(1_001, 500) == 99 + 50
    assert c.earnings == {s1: 1_999 - 99, s2: 1_001 - 50}
    assert c.fees + sum(c.earnings.values()) == c.charged

    h2 = led.create_hold(buyer, 700, idempotency_key="h2", request_ref="req_2")
    led.void_hold(h2.id, idempotency_key="v2")
    c2 = request_charges(session, "req_2")
    assert (c2.held, c2.charged, c2.refunded, c2.fees, c2.earnings, c2.pending) == (700, 0, 700, 0, {}, False)
    assert request_charges(session, "nothing").charged == 0
