"""Statements: an account's transfers with request refs, newest first, paged."""

from __future__ import annotations

import pytest

from pricing.errors import UnknownAccount
from pricing.ledger import AccountKind, Ledger
from pricing.statement import statement


def test_paged_statement_with_request_refs(session):
    led = Ledger(session)
    buyer = led.open_account(AccountKind.BUYER, ref="b")
    seller = led.open_account(AccountKind.SELLER_EARNINGS, ref="s")
    led.deposit(buyer.id, 10_000, idempotency_key="d")
    for i in range(7):
        h = led.create_hold(buyer.id, 100, idempotency_key=f"h{i}", request_ref=f"req_{i}")
        led.settle_hold(h.id, [(seller.id, 40)], 500, idempotency_key=f"s{i}")
    seen, cursor = [], None
    while True:
        page = statement(session, buyer.id, limit=4, before=cursor)
        assert page.balance == 10_000 - 7 * 40
        seen += page.entries
        cursor = page.next_cursor
        if cursor is None:
            break
    assert len(seen) == 1 + 7 * 2  # deposit, then hold + release per request
    assert [e.transfer_id for e in seen] == sorted((e.transfer_id for e in seen), reverse=True)
    assert sum(e.amount for e in seen) == page.balance
    assert seen[-1].kind == "deposit" and seen[-1].counterparty_kind == "external"
    req3 = statement(session, buyer.id, request_ref="req_3").entries
    assert [(e.kind, e.amount) for e in req3] == [("release", 60), ("hold", -100)]
    seller_entries = statement(session, seller.id).entries
    assert len(seller_entries) == 7 and all(e.amount == 38 and e.kind == "earning" for e in seller_entries)
    assert {e.request_ref for e in seller_entries} == {f"req_{i}" for i in range(7)}
    with pytest.raises(UnknownAccount):
        statement(session, 999)
