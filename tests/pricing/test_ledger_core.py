"""Ledger behaviour on SQLite: holds, partial and multi-part settlement, fees, voids,
idempotent replays, expiry, payouts."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlmodel import select

from pricing.errors import (
    HoldExceeded, HoldNotPending, IdempotencyConflict, InsufficientFunds, LedgerError, WrongAccountKind,
)
from pricing.ledger import (
    AccountKind, HoldState, Ledger, LedgerHold, LedgerIdempotency, LedgerTransfer, expire_holds, prune_idempotency,
    total_balance,
)
from pricing.ledger_models import _utcnow


@pytest.fixture
def led(session):
    return Ledger(session)


@pytest.fixture
def buyer(led):
    b = led.open_account(AccountKind.BUYER, ref="acct_b")
    led.deposit(b.id, 1_000, idempotency_key="dep-b")
    return b


@pytest.fixture
def sellers(led):
    return [led.open_account(AccountKind.SELLER_EARNINGS, ref=f"node_{i}") for i in range(3)]


def bal(led, kind):
    return led.system_balance(kind)


def test_open_account_is_get_or_create_and_system_singletons(led):
    a = led.open_account(AccountKind.BUYER, ref="x")
    assert led.open_account(AccountKind.BUYER, ref="x").id == a.id
    assert led.open_account(AccountKind.SELLER_EARNINGS, ref="x").id != a.id
    assert led.system(AccountKind.ESCROW).id == led.system(AccountKind.ESCROW).id
    with pytest.raises(LedgerError):
        led.system(AccountKind.BUYER)


def test_deposit_comes_from_external_and_replays(led, buyer):
    assert led.balance(buyer.id) == 1_000
    assert bal(led, AccountKind.EXTERNAL) == -1_000
    assert led.deposit(buyer.id, 1_000, idempotency_key="dep-b") == 1_000  # replay: no second credit
    assert led.balance(buyer.id) == 1_000
    with pytest.raises(IdempotencyConflict):
        led.deposit(buyer.id, 5, idempotency_key="dep-b")
    with pytest.raises(LedgerError):
        led.deposit(buyer.id, 0, idempotency_key="dep-0")
    assert total_balance(led.s) == 0


def test_hold_moves_to_escrow_and_refuses_overdraft(led, buyer):
    h = led.create_hold(buyer.id, 700, idempotency_key="h1", request_ref="req_1")
    assert h.state == HoldState.PENDING and h.amount == 700
    assert led.balance(buyer.id) == 300 and bal(led, AccountKind.ESCROW) == 700
    with pytest.raises(InsufficientFunds) as e:
        led.create_hold(buyer.id, 301, idempotency_key="h2")
    assert (e.value.available, e.value.needed) == (300, 301)
    # the failed call released its key: a corrected retry with the same key works
    assert led.create_hold(buyer.id, 300, idempotency_key="h2").amount == 300
    assert led.balance(buyer.id) == 0
    assert led.create_hold(buyer.id, 700, idempotency_key="h1", request_ref="req_1").id == h.id  # replay
    assert total_balance(led.s) == 0


def test_partial_settlement_fee_and_refund(led, buyer, sellers):
    h = led.create_hold(buyer.id, 600, idempotency_key="h", request_ref="req_p")
    r = led.settle_hold(h.id, parts=[(sellers[0].id, 199)], fee_bps=500, idempotency_key="s")
    assert (r.charged, r.fee, r.refunded) == (199, 9, 401)  # fee floored: the seller keeps the remainder
    assert led.balance(sellers[0].id) == 190
    assert bal(led, AccountKind.PLATFORM_FEES) == 9
    assert led.balance(buyer.id) == 400 + 401
    assert bal(led, AccountKind.ESCROW) == 0
    led.s.refresh(h)
    assert h.state == HoldState.POSTED and h.posted_amount == 199
    assert total_balance(led.s) == 0


def test_failover_settles_several_sellers_from_one_hold(led, buyer, sellers):
    h = led.create_hold(buyer.id, 1_000, idempotency_key="h", request_ref="req_f")
    parts = [(sellers[0].id, 333), (sellers[1].id, 101), (sellers[2].id, 0)]
    r = led.settle_hold(h.id, parts=parts, fee_bps=1_000, idempotency_key="s")
    assert r.charged == 434 and r.fee == 33 + 10 and r.refunded == 566
    assert [led.balance(s.id) for s in sellers] == [300, 91, 0]
    refs = {t.request_ref for t in led.s.exec(select(LedgerTransfer).where(LedgerTransfer.hold_id == h.id))}
    assert refs == {"req_f"}
    assert total_balance(led.s) == 0


def test_settle_replay_conflict_and_resolved_once(led, buyer, sellers):
    h = led.create_hold(buyer.id, 500, idempotency_key="h")
    first = led.settle_hold(h.id, [(sellers[0].id, 100)], 500, idempotency_key="s")
    again = led.settle_hold(h.id, [(sellers[0].id, 100)], 500, idempotency_key="s")
    assert again == first
    assert led.balance(sellers[0].id) == 95  # paid once
    with pytest.raises(IdempotencyConflict):
        led.settle_hold(h.id, [(sellers[0].id, 101)], 500, idempotency_key="s")
    with pytest.raises(HoldNotPending):
        led.settle_hold(h.id, [(sellers[0].id, 100)], 500, idempotency_key="s-other")
    with pytest.raises(HoldNotPending):
        led.void_hold(h.id, idempotency_key="v")
    assert total_balance(led.s) == 0


def test_settle_more_than_held_or_to_a_buyer_is_refused(led, buyer, sellers):
    h = led.create_hold(buyer.id, 100, idempotency_key="h")
    with pytest.raises(HoldExceeded):
        led.settle_hold(h.id, [(sellers[0].id, 60), (sellers[1].id, 41)], 0, idempotency_key="s1")
    with pytest.raises(WrongAccountKind):
        led.settle_hold(h.id, [(buyer.id, 10)], 0, idempotency_key="s2")
    with pytest.raises(LedgerError):
        led.settle_hold(h.id, [(sellers[0].id, -1)], 0, idempotency_key="s3")
    led.s.refresh(h)
    assert h.state == HoldState.PENDING and led.balance(buyer.id) == 900
    r = led.settle_hold(h.id, [(sellers[0].id, 100)], 0, idempotency_key="s1")  # key reusable after failure
    assert r.charged == 100 and r.refunded == 0


def test_void_returns_everything_once(led, buyer):
    h = led.create_hold(buyer.id, 250, idempotency_key="h")
    r = led.void_hold(h.id, idempotency_key="v")
    assert (r.charged, r.refunded) == (0, 250)
    assert led.void_hold(h.id, idempotency_key="v") == r
    assert led.balance(buyer.id) == 1_000
    with pytest.raises(HoldNotPending):
        led.void_hold(h.id, idempotency_key="v2")


def test_caller_owns_the_transaction(engine, session):
    led = Ledger(session)
    b = led.open_account(AccountKind.BUYER, ref="rb")
    session.commit()
    led.deposit(b.id, 50, idempotency_key="d")
    session.rollback()  # the caller's rollback undoes the money movement and the key
    assert led.balance(b.id) == 0
    assert led.deposit(b.id, 50, idempotency_key="d") == 50


def test_expire_holds_voids_only_overdue_pending(led, buyer, sellers):
    now = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    old = led.create_hold(buyer.id, 100, idempotency_key="h1", expires_at=now - timedelta(seconds=1))
    fresh = led.create_hold(buyer.id, 100, idempotency_key="h2", expires_at=now + timedelta(minutes=5))
    forever = led.create_hold(buyer.id, 100, idempotency_key="h3")
    done = led.create_hold(buyer.id, 100, idempotency_key="h4", expires_at=now - timedelta(hours=1))
    led.settle_hold(done.id, [(sellers[0].id, 100)], 0, idempotency_key="s4")
    assert expire_holds(led.s, now) == [old.id]
    assert expire_holds(led.s, now) == []
    states = {h.id: led.s.get(LedgerHold, h.id).state for h in (old, fresh, forever, done)}
    assert states == {old.id: HoldState.VOIDED, fresh.id: HoldState.PENDING,
                      forever.id: HoldState.PENDING, done.id: HoldState.POSTED}
    assert led.balance(buyer.id) == 1_000 - 300
    assert total_balance(led.s) == 0


def test_payout_from_earnings_is_idempotent(led, buyer, sellers):
    h = led.create_hold(buyer.id, 1_000, idempotency_key="h")
    led.settle_hold(h.id, [(sellers[0].id, 1_000)], 500, idempotency_key="s")
    assert led.payout(sellers[0].id, 900, idempotency_key="p1", destination_ref="iban:x") == 50
    assert led.payout(sellers[0].id, 900, idempotency_key="p1", destination_ref="iban:x") == 50
    assert led.balance(sellers[0].id) == 50
    with pytest.raises(IdempotencyConflict):
        led.payout(sellers[0].id, 10, idempotency_key="p1")
    with pytest.raises(InsufficientFunds):
        led.payout(sellers[0].id, 51, idempotency_key="p2")
    with pytest.raises(WrongAccountKind):
        led.payout(buyer.id, 1, idempotency_key="p3")
    assert bal(led, AccountKind.EXTERNAL) == -1_000 + 900
    assert total_balance(led.s) == 0


def test_pay_from_platform_draws_on_every_fee_shard(led, sellers):
    buyers = [led.open_account(AccountKind.BUYER, ref=f"pb{i}") for i in range(5)]
    for i, b in enumerate(buyers):  # each buyer's fees land in that buyer's shard
        led.deposit(b.id, 1_000, idempotency_key=f"pd{i}")
        h = led.create_hold(b.id, 1_000, idempotency_key=f"ph{i}")
        led.settle_hold(h.id, [(sellers[0].id, 1_000)], 1_000, idempotency_key=f"ps{i}")
    assert led.system_balance(AccountKind.PLATFORM_FEES) == 500
    assert led.pay_from_platform(sellers[1].id, 420, idempotency_key="v1") == 420
    assert led.pay_from_platform(sellers[1].id, 420, idempotency_key="v1") == 420  # replay
    assert led.pay_from_platform(sellers[1].id, 420, idempotency_key="v2") == 80   # what is left
    assert led.balance(sellers[1].id) == 500 and led.system_balance(AccountKind.PLATFORM_FEES) == 0
    assert total_balance(led.s) == 0


def test_old_idempotency_keys_are_pruned_and_young_ones_kept(session, led):
    buyer = led.open_account(AccountKind.BUYER, ref="prune-b").id
    led.deposit(buyer, 100, idempotency_key="old-1")
    led.deposit(buyer, 100, idempotency_key="old-2")
    led.deposit(buyer, 100, idempotency_key="young")
    for key in ("old-1", "old-2"):
        session.get(LedgerIdempotency, key).created_at = _utcnow() - timedelta(days=40)
    session.flush()
    cutoff = _utcnow() - timedelta(days=30)
    assert prune_idempotency(session, cutoff, limit=1) == 1  # bounded per call
    assert prune_idempotency(session, cutoff) == 1
    assert prune_idempotency(session, cutoff) == 0
    assert session.get(LedgerIdempotency, "young") is not None
    assert led.deposit(buyer, 100, idempotency_key="young") == 300  # still a replay
    assert total_balance(session) == 0


def test_hold_for_a_new_request_moves_to_escrow_refuses_overdraft_and_settles_like_any_hold(led, buyer, sellers):
    before = led.balance(buyer.id)  # an ORM copy of the buyer's row is in the session now
    hid = led.hold_for_new_request(buyer.id, 700, "req_fast")
    assert led.balance(buyer.id) == before - 700 == 300  # the copy was refreshed, not stale
    assert bal(led, AccountKind.ESCROW) == 700
    hold = led.s.get(LedgerHold, hid)
    assert (hold.state, hold.amount, hold.request_ref) == (HoldState.PENDING, 700, "req_fast")
    transfers = led.s.exec(select(LedgerTransfer).where(LedgerTransfer.hold_id == hid)).all()
    assert [(t.kind, t.debit_account_id, t.amount) for t in transfers] == [("hold", buyer.id, 700)]
    with pytest.raises(InsufficientFunds) as e:
        led.hold_for_new_request(buyer.id, 301, "req_too_big")
    assert (e.value.available, e.value.needed) == (300, 301)
    assert led.balance(buyer.id) == 300 and bal(led, AccountKind.ESCROW) == 700  # nothing moved
    with pytest.raises(WrongAccountKind):
        led.hold_for_new_request(sellers[0].id, 1, "req_wrong")
    with pytest.raises(LedgerError):
        led.hold_for_new_request(buyer.id, -1, "req_negative")
    led.settle_hold(hid, [(sellers[0].id, 500)], 1000, idempotency_key="s-fast")
    assert led.balance(buyer.id) == 500 and bal(led, AccountKind.ESCROW) == 0
    assert total_balance(led.s) == 0
