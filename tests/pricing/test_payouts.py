"""Payouts: earnings -> EXTERNAL on request, idempotent, never more than the balance."""

from __future__ import annotations

import pytest
from sqlmodel import select

from pricing.errors import IdempotencyConflict, InsufficientFunds, LedgerError, WrongAccountKind
from pricing.ledger import AccountKind, Ledger, LedgerAccount, total_balance
from pricing.payouts import earnings, request_payout


def external(s):
    """What has left the platform: the EXTERNAL balance (over all its rows)."""
    return sum(a.balance for a in s.exec(select(LedgerAccount).where(LedgerAccount.kind == AccountKind.EXTERNAL)))


@pytest.fixture
def env(session):
    led = Ledger(session)
    buyer = led.open_account(AccountKind.BUYER, ref="b").id
    seller = led.open_account(AccountKind.SELLER_EARNINGS, ref="s").id
    led.deposit(buyer, 10_000, idempotency_key="dep")
    h = led.create_hold(buyer, 5_000, idempotency_key="h", request_ref="req_1")
    led.settle_hold(h.id, [(seller, 4_000)], 500, idempotency_key="s")  # seller earns 3,800
    return session, led, buyer, seller


def test_payout_some_then_all(env):
    s, led, _, seller = env
    r = request_payout(s, seller, 1_000, idempotency_key="p1", destination_ref="iban:DE00")
    assert (r.amount, r.balance) == (1_000, 2_800)
    r = request_payout(s, seller, idempotency_key="p2")
    assert (r.amount, r.balance) == (2_800, 0)
    assert led.balance(seller) == 0
    assert external(s) == -10_000 + 3_800
    assert total_balance(s) == 0
    e = earnings(s, seller)
    assert (e.balance, e.earned, e.paid_out, e.other_in, e.other_out) == (0, 3_800, 3_800, 0, 0)


def test_replay_returns_first_answer_even_after_the_balance_moved(env):
    s, led, buyer, seller = env
    first = request_payout(s, seller, idempotency_key="all")
    h = led.create_hold(buyer, 1_000, idempotency_key="h2")
    led.settle_hold(h.id, [(seller, 1_000)], 0, idempotency_key="s2")
    assert request_payout(s, seller, idempotency_key="all") == first  # not a second payout
    assert led.balance(seller) == 1_000
    with pytest.raises(IdempotencyConflict):
        request_payout(s, seller, 10, idempotency_key="all")


def test_shares_keys_with_ledger_payout(env):
    s, led, _, seller = env
    assert led.payout(seller, 300, idempotency_key="k", destination_ref="d") == 3_500
    r = request_payout(s, seller, 300, idempotency_key="k", destination_ref="d")
    assert (r.amount, r.balance) == (300, 3_500) and led.balance(seller) == 3_500
    r = request_payout(s, seller, 200, idempotency_key="k2")
    assert led.payout(seller, 200, idempotency_key="k2") == r.balance == 3_300


def test_never_more_than_the_balance(env):
    s, led, buyer, seller = env
    with pytest.raises(InsufficientFunds) as exc:
        request_payout(s, seller, 3_801, idempotency_key="p")
    assert (exc.value.available, exc.value.needed) == (3_800, 3_801)
    # the failed key is released: a corrected request may use it
    assert request_payout(s, seller, 3_800, idempotency_key="p").balance == 0
    with pytest.raises(InsufficientFunds):
        request_payout(s, seller, idempotency_key="empty")  # nothing to pay
    with pytest.raises(InsufficientFunds):
        request_payout(s, seller, 50, idempotency_key="x")
    with pytest.raises(WrongAccountKind):
        request_payout(s, buyer, 1, idempotency_key="b")
    with pytest.raises(LedgerError):
        request_payout(s, seller, 0, idempotency_key="z")
    with pytest.raises(LedgerError):
        request_payout(s, seller, 10, idempotency_key="m", minimum=100)
    with pytest.raises(WrongAccountKind):
        earnings(s, buyer)
    assert total_balance(s) == 0
