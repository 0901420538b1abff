"""SQLite under concurrency (the embedded default): threads with their own connections to
one database file. BEGIN IMMEDIATE serialises writers, so a small balance is never
overdrawn and redelivered keys count once, as on PostgreSQL."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from sqlmodel import Session, select

from pricing.batch import Settlement, settle_many
from pricing.errors import HoldNotPending, InsufficientFunds
from pricing.ledger import AccountKind, HoldState, Ledger, LedgerHold, total_balance
from tests.pricing.helpers import in_tx

THREADS = 8


def test_threads_never_overdraw_and_settle_once(engine):
    buyer, seller = in_tx(engine, lambda led: (led.open_account(AccountKind.BUYER, ref="b").id,
                                               led.open_account(AccountKind.SELLER_EARNINGS, ref="s").id))
    in_tx(engine, lambda led: led.deposit(buyer, 5_000, idempotency_key="dep"))
    start = threading.Barrier(THREADS)

    def hold(i):
        if i < THREADS:
            start.wait()
        try:
            return in_tx(engine, lambda led: led.create_hold(buyer, 700, idempotency_key=f"h{i % 12}").id)
        except InsufficientFunds:
            return None

    with ThreadPoolExecutor(THREADS) as pool:
        got = {h for h in pool.map(hold, range(24)) if h is not None}  # keys h0..h11, each twice
    assert len(got) == 5_000 // 700 == 7

    def settle(job):
        hid, how = job
        try:
            if how == "batch":
                def run(led):
                    (r,) = settle_many(led.s, [Settlement(hid, [(seller, 300)], f"s{hid}")], fee_bps=500)
                    if isinstance(r, Exception):
                        raise r
                    return r
                return in_tx(engine, run)
            if how == "void":
                return in_tx(engine, lambda led: led.void_hold(hid, idempotency_key=f"v{hid}"))
            return in_tx(engine, lambda led: led.settle_hold(hid, [(seller, 300)], 500, idempotency_key=f"s{hid}"))
        except HoldNotPending:
            return None

    jobs = [(h, how) for h in sorted(got) for how in ("single", "batch", "void")]
    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(settle, jobs))
    settled = {h for (h, how), r in zip(jobs, results) if r is not None and how != "void"}
    voided = {h for (h, how), r in zip(jobs, results) if r is not None and how == "void"}
    assert settled | voided == got and not settled & voided  # each hold resolved once
    for h in settled:  # the single and the batched delivery of one settlement agree
        a, b = (r for (hh, how), r in zip(jobs, results) if hh == h and how != "void")
        assert a == b
    with Session(engine) as s:
        led = Ledger(s)
        assert led.balance(seller) == len(settled) * (300 - 15)
        assert led.balance(buyer) == 5_000 - len(settled) * 300
        assert {h.state for h in s.exec(select(LedgerHold))} <= {HoldState.POSTED, HoldState.VOIDED}
        assert led.system_balance(AccountKind.ESCROW) == 0 and total_balance(s) == 0
