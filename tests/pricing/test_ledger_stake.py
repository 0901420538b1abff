"""Stake: minimum per model, slashing to buyers and the platform, unbonding delay."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pricing.errors import IdempotencyConflict, InsufficientFunds, LedgerError, WrongAccountKind
from pricing.ledger import AccountKind, Ledger, total_balance
from pricing.ledger_models import LedgerUnbonding, UnbondingState
from pricing.stake import Stake, StakePolicy, withdraw_matured

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


@pytest.fixture
def env(session):
    led = Ledger(session)
    stake_acct = led.open_account(AccountKind.SELLER_STAKE, ref="node_1")
    buyer = led.open_account(AccountKind.BUYER, ref="acct_1")
    policy = StakePolicy(default_min=100, per_model={"big-70b": 1_000}, unbonding_delay=timedelta(days=3))
    stake = Stake(led, policy)
    stake.deposit(stake_acct.id, 500, idempotency_key="stake-dep")
    return led, stake, stake_acct, buyer


def test_minimum_per_model(env):
    led, stake, acct, _ = env
    assert stake.may_sell(acct.id, "tiny") and not stake.may_sell(acct.id, "big-70b")
    assert stake.deposit(acct.id, 500, idempotency_key="stake-dep2") == 1_000
    assert stake.may_sell(acct.id, "big-70b")


def test_deposit_only_to_stake_accounts(env):
    led, stake, _, buyer = env
    with pytest.raises(WrongAccountKind):
        stake.deposit(buyer.id, 5, idempotency_key="x")


def test_slash_compensates_buyers_and_platform(env):
    led, stake, acct, buyer = env
    r = stake.slash(acct.id, 300, to=[(buyer.id, 120)], idempotency_key="sl1", reason="verify:job_9")
    assert (r.slashed, r.to_buyers, r.to_platform) == (300, 120, 180)
    assert stake.slash(acct.id, 300, to=[(buyer.id, 120)], idempotency_key="sl1", reason="verify:job_9") == r
    assert led.balance(acct.id) == 200 and led.balance(buyer.id) == 120
    assert led.system_balance(AccountKind.PLATFORM_FEES) == 180
    with pytest.raises(IdempotencyConflict):
        stake.slash(acct.id, 301, to=[(buyer.id, 120)], idempotency_key="sl1", reason="verify:job_9")
    with pytest.raises(InsufficientFunds):
        stake.slash(acct.id, 201, idempotency_key="sl2")
    with pytest.raises(LedgerError):
        stake.slash(acct.id, 10, to=[(buyer.id, 11)], idempotency_key="sl3")
    assert total_balance(led.s) == 0


def test_unbonding_waits_for_the_delay_and_pays_once(env):
    led, stake, acct, _ = env
    u = stake.request_unbond(acct.id, 400, idempotency_key="ub1", now=T0)
    assert u.matures_at == T0 + timedelta(days=3)
    assert stake.bonded(acct.id) == 100 and led.balance(acct.id) == 500
    with pytest.raises(InsufficientFunds):  # only 100 is still bonded
        stake.request_unbond(acct.id, 101, idempotency_key="ub2", now=T0)
    assert withdraw_matured(led.s, T0 + timedelta(days=2)) == []
    assert withdraw_matured(led.s, T0 + timedelta(days=3)) == [(u.id, 400)]
    assert withdraw_matured(led.s, T0 + timedelta(days=4)) == []
    assert led.balance(acct.id) == 100
    assert led.system_balance(AccountKind.EXTERNAL) == -100
    assert total_balance(led.s) == 0


def test_stake_under_unbonding_can_still_be_slashed(env):
    led, stake, acct, buyer = env
    u = stake.request_unbond(acct.id, 500, idempotency_key="ub", now=T0)
    assert stake.bonded(acct.id) == 0 and not stake.may_sell(acct.id, "tiny")
    stake.slash(acct.id, 350, to=[(buyer.id, 350)], idempotency_key="sl")
    assert withdraw_matured(led.s, T0 + timedelta(days=5)) == [(u.id, 150)]  # capped at what is left
    row = led.s.get(LedgerUnbonding, u.id)
    assert row.state == UnbondingState.WITHDRAWN and row.withdrawn_amount == 150
    assert led.balance(acct.id) == 0 and total_balance(led.s) == 0
