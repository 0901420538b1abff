"""Crash and retry on PostgreSQL: a worker process dies between hold and settlement, or
after committing a settlement but before acknowledging it; the redelivered work with the
same idempotency keys loses nothing and doubles nothing."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest
from sqlalchemy import create_engine
from sqlmodel import Session

from pricing.ledger import AccountKind, HoldState, Ledger, LedgerHold, total_balance

pytestmark = pytest.mark.postgres


def _worker(url: str, buyer: int, seller: int, die: str) -> None:
    engine = create_engine(url)
    with Session(engine) as s:
        led = Ledger(s)
        hold = led.create_hold(buyer, 1_000, idempotency_key="hold:req_1", request_ref="req_1")
        if die == "after_hold":
            s.commit()
            os._exit(1)  # killed between hold and settlement
        led.settle_hold(hold.id, [(seller, 640)], 500, idempotency_key="settle:req_1")
        if die == "before_commit":
            s.flush()
            os._exit(1)  # killed mid-transaction: nothing of it may survive
        s.commit()
        os._exit(1)  # killed after commit, before the task was acknowledged


def _run(url, buyer, seller, die):
    p = mp.get_context("spawn").Process(target=_worker, args=(url, buyer, seller, die))
    p.start()
    p.join(60)
    assert p.exitcode == 1


@pytest.mark.parametrize("die", ["before_commit", "after_hold", "after_commit"])
def test_redelivery_after_a_killed_worker(pg_url, pg_engine, die):
    with Session(pg_engine) as s:
        led = Ledger(s)
        buyer = led.open_account(AccountKind.BUYER, ref="b").id
        seller = led.open_account(AccountKind.SELLER_EARNINGS, ref="s").id
        led.deposit(buyer, 5_000, idempotency_key="dep")
        s.commit()
    _run(pg_url, buyer, seller, die)
    for _ in range(2):  # the redelivered task, then a second redelivery
        with Session(pg_engine) as s:
            led = Ledger(s)
            hold = led.create_hold(buyer, 1_000, idempotency_key="hold:req_1", request_ref="req_1")
            r = led.settle_hold(hold.id, [(seller, 640)], 500, idempotency_key="settle:req_1")
            s.commit()
            assert (r.charged, r.fee, r.refunded) == (640, 32, 360)
    with Session(pg_engine) as s:
        led = Ledger(s)
        assert led.balance(buyer) == 5_000 - 640
        assert led.balance(seller) == 608
        assert [h.state for h in s.query(LedgerHold).all()] == [HoldState.POSTED]
        assert total_balance(s) == 0
