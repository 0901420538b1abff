"""Stake on one session: deposit, minimum per model, slash (with partial slashing when the
stake is short), unbonding that stays slashable until withdrawn."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from pricing.errors import InsufficientFunds, WrongAccountKind
from pricing.ledger import AccountKind, Ledger, total_balance
from pricing.stake import StakePolicy, withdraw_matured
from tests.pricing.helpers import bonded_stake, deposit_stake, has_min_stake, request_unbond, slash

T0 = datetime(2026, 5, 1, tzinfo=timezone.utc)
POLICY = StakePolicy(default_min=1_000, per_model={"llama-70b": 5_000}, unbonding_delay=timedelta(hours=12))


@pytest.fixture
def env(session):
    led = Ledger(session)
    stake = led.open_account(AccountKind.SELLER_STAKE, ref="node:a").id
    buyers = [led.open_account(AccountKind.BUYER, ref=f"b{i}").id for i in range(2)]
    seller = led.open_account(AccountKind.SELLER_EARNINGS, ref="node:a").id
    assert deposit_stake(session, stake, 4_000, idempotency_key="st") == 4_000
    return session, led, stake, buyers, seller


def test_minimum_per_model_counts_bonded_stake_only(env):
    s, _, stake, _, _ = env
    assert has_min_stake(s, stake, "tiny", POLICY) and not has_min_stake(s, stake, "llama-70b", POLICY)
    request_unbond(s, stake, 3_500, idempotency_key="u", policy=POLICY, now=T0)
    assert bonded_stake(s, stake) == 500 and not has_min_stake(s, stake, "tiny", POLICY)
    assert has_min_stake(s, stake, "tiny")  # the default policy asks for nothing


def test_slash_refunds_buyers_then_platform_and_replays(env):
    s, led, stake, buyers, _ = env
    r = slash(s, stake, 1_000, refunds=[(buyers[0], 300), (buyers[1], 200)], idempotency_key="sl",
              reason="audit:job_1")
    assert (r.slashed, r.to_buyers, r.to_platform) == (1_000, 500, 500)
    assert slash(s, stake, 1_000, refunds=[(buyers[0], 300), (buyers[1], 200)], idempotency_key="sl",
                 reason="audit:job_1") == r
    assert [led.balance(b) for b in buyers] == [300, 200] and led.balance(stake) == 3_000
    assert led.system_balance(AccountKind.PLATFORM_FEES) == 500
    assert total_balance(s) == 0


def test_slash_pays_only_buyers(env):
    s, _, stake, _, seller = env
    with pytest.raises(WrongAccountKind):
        slash(s, stake, 100, refunds=[(seller, 100)], idempotency_key="x")
    with pytest.raises(WrongAccountKind):
        slash(s, seller, 100, idempotency_key="y")


def test_partial_slash_takes_what_there_is_buyers_first(env):
    s, led, stake, buyers, _ = env
    with pytest.raises(InsufficientFunds):
        slash(s, stake, 10_000, refunds=[(buyers[0], 3_000), (buyers[1], 3_000)], idempotency_key="p")
    r = slash(s, stake, 10_000, refunds=[(buyers[0], 3_000), (buyers[1], 3_000)], idempotency_key="p",
              allow_partial=True)
    assert (r.slashed, r.to_buyers, r.to_platform) == (4_000, 4_000, 0)
    assert [led.balance(b) for b in buyers] == [3_000, 1_000] and led.balance(stake) == 0
    r2 = slash(s, stake, 10, idempotency_key="p2", allow_partial=True)  # nothing left: a no-op
    assert (r2.slashed, r2.to_buyers, r2.to_platform) == (0, 0, 0)
    assert total_balance(s) == 0


def test_unbonding_stake_is_slashable_until_withdrawn(env):
    s, led, stake, buyers, _ = env
    u = request_unbond(s, stake, 4_000, idempotency_key="u", policy=POLICY, now=T0)
    assert u.matures_at == T0 + timedelta(hours=12)
    assert withdraw_matured(s, T0 + timedelta(hours=11)) == []
    slash(s, stake, 2_500, refunds=[(buyers[0], 2_500)], idempotency_key="sl")  # found during the delay
    assert withdraw_matured(s, T0 + timedelta(hours=12)) == [(u.id, 1_500)]
    assert withdraw_matured(s, T0 + timedelta(days=30)) == []  # paid once
    with pytest.raises(InsufficientFunds):  # nothing left to slash after withdrawal
        slash(s, stake, 1, idempotency_key="late")
    assert led.balance(stake) == 0 and led.system_balance(AccountKind.EXTERNAL) == -4_000 + 1_500
    assert total_balance(s) == 0
