"""settle_many: the batched path gives the same books as settle_hold, item by item, on
SQLite and PostgreSQL; replays cross paths; bad items fail alone."""

from __future__ import annotations

import pytest
from sqlmodel import Session, select

from pricing.batch import Settlement, settle_many
from pricing.errors import HoldExceeded, HoldNotPending, IdempotencyConflict, WrongAccountKind
from pricing.ledger import AccountKind, HoldState, Ledger, LedgerAccount, LedgerHold, total_balance


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_engine(request):
    return request.getfixturevalue("engine" if request.param == "sqlite" else "pg_engine")


def books(s):
    rows = s.exec(select(LedgerAccount.kind, LedgerAccount.ref, LedgerAccount.balance)).all()
    return sorted((k.value, r, b) for k, r, b in rows)


def build(s, n=12):
    led = Ledger(s)
    buyers = [led.open_account(AccountKind.BUYER, ref=f"b{i}").id for i in range(3)]
    sellers = [led.open_account(AccountKind.SELLER_EARNINGS, ref=f"s{i}").id for i in range(2)]
    for b in buyers:
        led.deposit(b, 100_000, idempotency_key=f"d{b}")
    holds = [led.create_hold(buyers[i % 3], 5_000 + i, idempotency_key=f"h{i}", request_ref=f"r{i}").id
             for i in range(n)]
    items = [Settlement(h, [(sellers[i % 2], 1_999 * (i % 3)), (sellers[(i + 1) % 2], 7 * i)], f"s{i}")
             for i, h in enumerate(holds)]
    return led, buyers, sellers, holds, items


def test_same_books_as_settle_hold(any_engine, tmp_path):
    from .conftest import make_engine

    with Session(any_engine) as s:
        led, _, _, _, items = build(s)
        batched = settle_many(s, items, fee_bps=500)
        s.commit()
        batched_books = books(s)
        assert total_balance(s) == 0
        assert all(h.state == HoldState.POSTED for h in s.exec(select(LedgerHold)))
    ref_engine = make_engine(f"sqlite:///{tmp_path / 'ref.db'}")
    with Session(ref_engine) as s:
        led, _, _, _, items = build(s)
        one_by_one = [led.settle_hold(it.hold_id, it.parts, 500, idempotency_key=it.idempotency_key)
                      for it in items]
        s.commit()
        assert books(s) == batched_books
    assert batched == one_by_one
    ref_engine.dispose()


def test_replays_conflicts_and_bad_items_fail_alone(any_engine):
    with Session(any_engine) as s:
        led, buyers, sellers, holds, items = build(s, n=6)
        first = led.settle_hold(items[0].hold_id, items[0].parts, 500, idempotency_key=items[0].idempotency_key)
        s.commit()
        batch = [
            items[0],                                                # replay of settle_hold
            Settlement(items[1].hold_id, [(sellers[0], 10)], items[0].idempotency_key),  # key reused
            Settlement(items[0].hold_id, items[0].parts, "other"),   # hold already posted
            Settlement(items[2].hold_id, [(sellers[0], 10**9)], "big"),
            Settlement(items[3].hold_id, [(buyers[0], 1)], "to-buyer"),
            items[4],
            items[4],                                                # repeated within the batch
            Settlement(items[4].hold_id, [(sellers[1], 1)], "second-key-same-hold"),
        ]
        r = settle_many(s, batch, fee_bps=500)
        s.commit()
        assert r[0] == first
        assert isinstance(r[1], IdempotencyConflict)
        assert isinstance(r[2], HoldNotPending)
        assert isinstance(r[3], HoldExceeded)
        assert isinstance(r[4], WrongAccountKind)
        assert r[5] == r[6] and r[5].charged == sum(g for _, g in items[4].parts)
        assert isinstance(r[7], HoldNotPending)
        # replaying the whole batch (a redelivered task) changes nothing
        before = books(s)
        again = settle_many(s, [items[4], items[0]], fee_bps=500)
        assert again == [r[5], first] and books(s) == before
        # the failed items can be settled later, and settle_hold replays settle_many's keys
        assert led.settle_hold(items[4].hold_id, items[4].parts, 500, idempotency_key=items[4].idempotency_key) == r[5]
        assert isinstance(settle_many(s, [Settlement(items[2].hold_id, [(sellers[0], 10)], "big")], fee_bps=500)[0],
                          type(first))
        assert total_balance(s) == 0
