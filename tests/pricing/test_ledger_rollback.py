"""Crash and retry on SQLite, at the ledger level: a transaction that dies anywhere between
hold and settlement (even between two transfers of one settlement) leaves nothing
half-done, and re-running the settlement with the same key charges once."""

from __future__ import annotations

import pytest
from sqlmodel import Session, select

from pricing.batch import Settlement, settle_many
from pricing.ledger import (
    AccountKind, HoldState, Ledger, LedgerAccount, LedgerHold, LedgerIdempotency, LedgerTransfer, total_balance,
)


class Crash(Exception):
    pass


@pytest.fixture
def ids(engine):
    with Session(engine) as s:
        led = Ledger(s)
        buyer = led.open_account(AccountKind.BUYER, ref="b").id
        sellers = [led.open_account(AccountKind.SELLER_EARNINGS, ref=f"s{i}").id for i in range(2)]
        led.deposit(buyer, 10_000, idempotency_key="dep")
        s.commit()
    return buyer, sellers


def snapshot(engine):
    with Session(engine) as s:
        led = Ledger(s)
        return (sorted((t.kind, t.amount) for t in s.exec(select(LedgerTransfer))),
                sorted((h.state, h.posted_amount) for h in s.exec(select(LedgerHold))),
                sorted(k for k in s.exec(select(LedgerIdempotency.key))),
                led.system_balance(AccountKind.ESCROW))


def settle(engine, hold_id, sellers):
    with Session(engine) as s:
        r = Ledger(s).settle_hold(hold_id, [(sellers[0], 3_000), (sellers[1], 1_000)], 500,
                                  idempotency_key="settle:req_1")
        s.commit()
        return r


def test_crash_between_hold_and_settle_then_retry(engine, ids):
    buyer, sellers = ids
    with Session(engine) as s:
        hid = Ledger(s).create_hold(buyer, 5_000, idempotency_key="hold:req_1", request_ref="req_1").id
        s.commit()
    before = snapshot(engine)
    with Session(engine) as s:  # the worker settles, then dies before committing
        Ledger(s).settle_hold(hid, [(sellers[0], 3_000), (sellers[1], 1_000)], 500,
                              idempotency_key="settle:req_1")
        s.flush()
        s.rollback()
    assert snapshot(engine) == before  # nothing of the settlement survived, the key is free
    first = settle(engine, hid, sellers)
    assert settle(engine, hid, sellers) == first  # redelivered after commit: a replay
    with Session(engine) as s:
        led = Ledger(s)
        assert (first.charged, first.fee, first.refunded) == (4_000, 200, 1_000)
        assert led.balance(buyer) == 6_000
        assert [led.balance(a) for a in sellers] == [2_850, 950]
        assert led.system_balance(AccountKind.ESCROW) == 0 and total_balance(s) == 0


def test_crash_between_two_transfers_of_one_settlement(engine, ids, monkeypatch):
    buyer, sellers = ids
    with Session(engine) as s:
        hid = Ledger(s).create_hold(buyer, 5_000, idempotency_key="hold:req_1").id
        s.commit()
    before = snapshot(engine)
    real_move, calls = Ledger._move, []

    def dying_move(self, *a, **kw):
        calls.append(a[3])
        if len(calls) == 3:  # after the first seller's earning and fee
            raise Crash()
        return real_move(self, *a, **kw)

    monkeypatch.setattr(Ledger, "_move", dying_move)
    with pytest.raises(Crash):
        settle(engine, hid, sellers)  # the session closes without committing
    monkeypatch.setattr(Ledger, "_move", real_move)
    assert snapshot(engine) == before
    settle(engine, hid, sellers)
    with Session(engine) as s:
        assert Ledger(s).balance(buyer) == 6_000 and total_balance(s) == 0


def test_a_caught_failure_inside_the_callers_transaction_is_undone_alone(engine, ids, monkeypatch):
    """The caller catches the crash and commits the rest of its transaction: the failed
    settlement's savepoint is rolled back, its key released, the other work kept."""
    buyer, sellers = ids
    with Session(engine) as s:
        led = Ledger(s)
        hid = led.create_hold(buyer, 5_000, idempotency_key="hold:req_1").id
        real_move = Ledger._move

        def dying_move(self, accts, debit, credit, amount, kind, *a, **kw):
            if kind == "release":
                raise Crash()
            return real_move(self, accts, debit, credit, amount, kind, *a, **kw)

        monkeypatch.setattr(Ledger, "_move", dying_move)
        with pytest.raises(Crash):
            led.settle_hold(hid, [(sellers[0], 3_000)], 500, idempotency_key="settle:req_1")
        monkeypatch.setattr(Ledger, "_move", real_move)
        led.deposit(buyer, 1, idempotency_key="dep2")
        s.commit()
    with Session(engine) as s:
        led = Ledger(s)
        assert s.get(LedgerHold, hid).state == HoldState.PENDING
        assert led.balance(buyer) == 5_001 and led.balance(sellers[0]) == 0
        assert s.get(LedgerIdempotency, "settle:req_1") is None
        assert total_balance(s) == 0
    settle(engine, hid, sellers)
    with Session(engine) as s:
        assert Ledger(s).balance(buyer) == 6_001 and total_balance(s) == 0


def test_batched_settlement_rolled_back_then_redelivered(engine, ids):
    buyer, sellers = ids
    with Session(engine) as s:
        led = Ledger(s)
        holds = [led.create_hold(buyer, 1_000, idempotency_key=f"h{i}").id for i in range(5)]
        s.commit()
    items = [Settlement(h, [(sellers[i % 2], 100 * i)], f"s{h}") for i, h in enumerate(holds)]
    before = snapshot(engine)
    with Session(engine) as s:
        settle_many(s, items, fee_bps=500)
        s.rollback()
    assert snapshot(engine) == before
    for _ in range(2):  # delivered, then redelivered
        with Session(engine) as s:
            out = settle_many(s, items, fee_bps=500)
            s.commit()
    assert [r.charged for r in out] == [0, 100, 200, 300, 400]
    with Session(engine) as s:
        assert Ledger(s).balance(buyer) == 10_000 - 1_000 and total_balance(s) == 0
        assert {h.state for h in s.exec(select(LedgerHold))} == {HoldState.POSTED}


def test_system_account_ids_are_remembered_per_database_and_never_from_a_rolled_back_transaction(tmp_path):
    """The ledger remembers the ids of system accounts (escrow shards) across transactions.
    Two databases in one process number them differently, and a shard created by a
    transaction that rolls back does not exist: neither may leak into another hold."""
    from tests.pricing.conftest import make_engine

    a, b = (make_engine(f"sqlite:///{tmp_path / n}") for n in ("a.db", "b.db"))
    try:
        with Session(b) as s:  # b numbers its accounts differently: some accounts first
            led = Ledger(s)
            for i in range(5):
                led.open_account(AccountKind.BUYER, f"filler-{i}")
            s.commit()
        for engine in (a, b):
            with Session(engine) as s:  # the escrow shard is created here, then rolled back
                led = Ledger(s)
                buyer = led.open_account(AccountKind.BUYER, "rolled-back").id
                led.deposit(buyer, 100, idempotency_key="dep-rb")
                led.create_hold(buyer, 10, idempotency_key="hold-rb")
                s.rollback()
            with Session(engine) as s:
                led = Ledger(s)
                buyer = led.open_account(AccountKind.BUYER, "buyer").id
                led.deposit(buyer, 1_000, idempotency_key="dep")
                hold = led.create_hold(buyer, 300, idempotency_key="hold")
                s.commit()
                escrow = s.exec(select(LedgerAccount).where(LedgerAccount.id == hold_escrow(s, hold.id))).one()
                assert escrow.kind == AccountKind.ESCROW and escrow.balance == 300
                assert led.balance(buyer) == 700 and total_balance(s) == 0
    finally:
        a.dispose()
        b.dispose()


def hold_escrow(s: Session, hold_id: int) -> int:
    return s.exec(select(LedgerTransfer.credit_account_id).where(LedgerTransfer.hold_id == hold_id)).one()
