"""Idempotency under races on PostgreSQL: the first use of a key by several transactions
at once, a first attempt that fails and releases its key while another waits on it, and a
batched settlement racing a single settlement redelivered with the same keys."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlmodel import Session, select

from pricing.batch import Settlement, settle_many
from pricing.errors import IdempotencyConflict, InsufficientFunds
from pricing.ledger import AccountKind, HoldState, Ledger, LedgerHold, LedgerTransfer, total_balance
from tests.pricing.helpers import in_tx

pytestmark = pytest.mark.postgres

THREADS = 16


def accounts(engine):
    return in_tx(engine, lambda led: (led.open_account(AccountKind.BUYER, ref="b").id,
                                      led.open_account(AccountKind.SELLER_EARNINGS, ref="s").id))


def test_first_use_of_a_key_by_many_transactions_with_different_params(pg_engine):
    buyer, _ = accounts(pg_engine)
    start = threading.Barrier(THREADS)

    def dep(i):
        start.wait()
        try:
            return ("ok", i % 2, in_tx(pg_engine, lambda led: led.deposit(buyer, 100 + i % 2,
                                                                          idempotency_key="same")))
        except IdempotencyConflict:
            return ("conflict", i % 2, None)

    with ThreadPoolExecutor(THREADS) as pool:
        out = list(pool.map(dep, range(THREADS)))
    winners = {variant for kind, variant, _ in out if kind == "ok"}
    assert len(winners) == 1  # one parameter set won the key; the other only ever conflicts
    (w,) = winners
    assert all(kind == "conflict" for kind, variant, _ in out if variant != w)
    assert {bal for kind, _, bal in out if kind == "ok"} == {100 + w}
    with Session(pg_engine) as s:
        assert Ledger(s).balance(buyer) == 100 + w
        assert len(s.exec(select(LedgerTransfer)).all()) == 1
        assert total_balance(s) == 0


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_a_failed_first_attempt_releases_the_key_to_a_waiting_one(pg_engine, end):
    """A's hold fails (short balance) but A's transaction stays open a while; B, with the
    same key and a feasible amount, waits on A's claim and then succeeds exactly once."""
    buyer, _ = accounts(pg_engine)
    in_tx(pg_engine, lambda led: led.deposit(buyer, 500, idempotency_key="dep"))
    failed = threading.Event()

    def a():
        with Session(pg_engine) as s:
            with pytest.raises(InsufficientFunds):
                Ledger(s).create_hold(buyer, 900, idempotency_key="k", request_ref="r")
            failed.set()
            time.sleep(0.5)  # B is now blocked on A's (deleted) claim row
            s.commit() if end == "commit" else s.rollback()

    def b():
        failed.wait(10)
        return in_tx(pg_engine, lambda led: led.create_hold(buyer, 400, idempotency_key="k",
                                                            request_ref="r").amount)

    ta = threading.Thread(target=a)
    ta.start()
    assert b() == 400
    ta.join()
    # a replay of B's call returns B's hold; A's parameters now conflict
    assert in_tx(pg_engine, lambda led: led.create_hold(buyer, 400, idempotency_key="k",
                                                        request_ref="r").amount) == 400
    with pytest.raises(IdempotencyConflict):
        in_tx(pg_engine, lambda led: led.create_hold(buyer, 900, idempotency_key="k", request_ref="r"))
    with Session(pg_engine) as s:
        assert Ledger(s).balance(buyer) == 100
        assert len(s.exec(select(LedgerHold)).all()) == 1
        assert total_balance(s) == 0


def test_batched_settlement_racing_a_redelivered_single_one(pg_engine):
    """The same settlements (same keys, same parameters) arrive through settle_many and
    through settle_hold at once: every hold is posted once, and both callers get the same
    answer for every key (a replay, not HoldNotPending)."""
    buyer, seller = accounts(pg_engine)
    in_tx(pg_engine, lambda led: led.deposit(buyer, 1_000_000, idempotency_key="dep"))
    n = 40
    holds = in_tx(pg_engine, lambda led: [led.create_hold(buyer, 10_000, idempotency_key=f"h{i}").id
                                          for i in range(n)])
    items = [Settlement(h, [(seller, 1_000 + i)], f"s{h}") for i, h in enumerate(holds)]
    start = threading.Barrier(2)

    def batched():
        start.wait()
        with Session(pg_engine) as s:
            out = settle_many(s, items, fee_bps=500)
            s.commit()
            return out

    def singles():
        start.wait()
        out = []
        for it in reversed(items):  # meet the batch somewhere in the middle
            out.append(in_tx(pg_engine, lambda led: led.settle_hold(
                it.hold_id, it.parts, 500, idempotency_key=it.idempotency_key)))
        return out[::-1]

    with ThreadPoolExecutor(2) as pool:
        fb, fs = pool.submit(batched), pool.submit(singles)
        from_batch, from_singles = fb.result(60), fs.result(60)
    assert from_batch == from_singles
    with Session(pg_engine) as s:
        led = Ledger(s)
        gross = sum(1_000 + i for i in range(n))
        fees = sum((1_000 + i) * 500 // 10_000 for i in range(n))
        assert led.balance(seller) == gross - fees
        assert led.balance(buyer) == 1_000_000 - gross
        assert {h.state for h in s.exec(select(LedgerHold))} == {HoldState.POSTED}
        assert total_balance(s) == 0


def test_expiry_sweep_racing_settlements_resolves_each_hold_once(pg_engine):
    """The beat task voids overdue holds while workers settle the same buyer's holds: no
    deadlock, every hold resolved exactly once, the books exact."""
    from datetime import timedelta

    from pricing.ledger import expire_holds
    from pricing.ledger_models import _utcnow

    buyer, seller = accounts(pg_engine)
    in_tx(pg_engine, lambda led: led.deposit(buyer, 10_000_000, idempotency_key="dep"))
    past = _utcnow() - timedelta(seconds=1)
    n = 120
    holds = in_tx(pg_engine, lambda led: [led.create_hold(buyer, 1_000, idempotency_key=f"h{i}",
                                                          expires_at=past).id for i in range(n)])
    start = threading.Barrier(THREADS + 1)

    def settle(chunk):
        start.wait()
        won = []
        for hid in chunk:
            try:
                in_tx(pg_engine, lambda led: led.settle_hold(hid, [(seller, 600)], 500,
                                                             idempotency_key=f"s{hid}"))
                won.append(hid)
            except HoldNotPending:
                pass
        return won

    def sweep():
        start.wait()
        voided = []
        for _ in range(n // 10):
            with Session(pg_engine) as s:
                voided += expire_holds(s, limit=10)
                s.commit()
        return voided

    from pricing.errors import HoldNotPending

    chunks = [holds[i::THREADS] for i in range(THREADS)]
    with ThreadPoolExecutor(THREADS + 1) as pool:
        fsweep = pool.submit(sweep)
        settled = sum(pool.map(settle, chunks), [])
        voided = fsweep.result(60)
    with Session(pg_engine) as s:
        voided += expire_holds(s)  # anything the sweeps skipped
        s.commit()
    assert sorted(settled + voided) == sorted(holds)  # each exactly once
    with Session(pg_engine) as s:
        led = Ledger(s)
        assert led.balance(seller) == len(settled) * (600 - 30)
        assert led.balance(buyer) == 10_000_000 - len(settled) * 600
        assert led.system_balance(AccountKind.ESCROW) == 0
        assert total_balance(s) == 0


@pytest.mark.parametrize("external_exists", [True, False])
def test_rows_committed_after_a_repeatable_read_snapshot_ask_for_a_retry(pg_engine, external_exists):
    """Under REPEATABLE READ the key's first use (or a system account's creation) may be
    committed yet invisible: the second transaction gets a clear retryable error, nothing
    happens twice, and its retry replays the first answer."""
    from pricing.errors import RetryableConflict

    buyer, _ = accounts(pg_engine)
    if external_exists:  # then the race is on the idempotency key itself
        in_tx(pg_engine, lambda led: led.system(AccountKind.EXTERNAL))
    rr = pg_engine.execution_options(isolation_level="REPEATABLE READ")
    with Session(rr) as late:
        Ledger(late).balance(buyer)  # the snapshot is taken here
        assert in_tx(pg_engine, lambda led: led.deposit(buyer, 70, idempotency_key="k")) == 70
        with pytest.raises(RetryableConflict):
            Ledger(late).deposit(buyer, 70, idempotency_key="k")
        late.rollback()
    assert in_tx(rr, lambda led: led.deposit(buyer, 70, idempotency_key="k")) == 70
    with Session(pg_engine) as s:
        assert Ledger(s).balance(buyer) == 70 and total_balance(s) == 0
