"""Property-based: random sequences of stake deposits, unbonding requests, slashes (full
and partial, to buyers and the platform), matured withdrawals, payouts and replays on
SQLite, checked against a plain-Python model.

Invariants: the sum of all balances is zero; no stake, buyer or earnings balance is ever
negative; bonded stake is the balance less pending unbonding; each unbonding request is
paid at most once, never more than requested nor more than the stake still held; a slash
takes no more than the stake holds; replays change nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sqlmodel import Session, select

from pricing.errors import InsufficientFunds
from pricing.ledger import AccountKind, Ledger, LedgerAccount, total_balance
from pricing.ledger_models import LedgerUnbonding, UnbondingState
from pricing.payouts import request_payout
from pricing.stake import StakePolicy, withdraw_matured
from tests.pricing.helpers import bonded_stake, deposit_stake, request_unbond, slash

from .conftest import make_engine

T0 = datetime(2026, 6, 1, tzinfo=timezone.utc)
POLICY = StakePolicy(unbonding_delay=timedelta(hours=2))


class StakeMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        self.engine = make_engine("sqlite://")
        self.s = Session(self.engine)
        led = Ledger(self.s)
        self.stakes = [led.open_account(AccountKind.SELLER_STAKE, ref=f"n{i}").id for i in range(2)]
        self.buyers = [led.open_account(AccountKind.BUYER, ref=f"b{i}").id for i in range(2)]
        self.earn = led.open_account(AccountKind.SELLER_EARNINGS, ref="n0").id
        self.bal = {a: 0 for a in (*self.stakes, *self.buyers, self.earn)}
        self.unbond: dict[int, dict] = {}  # id -> {acct, amount, matures, paid}
        self.replays, self.n, self.now = [], 0, T0
        # seed some earnings to pay out
        led.deposit(self.buyers[0], 50_000, idempotency_key="seed")
        h = led.create_hold(self.buyers[0], 50_000, idempotency_key="seed-h")
        led.settle_hold(h.id, [(self.earn, 40_000)], 0, idempotency_key="seed-s")
        self.bal[self.buyers[0]], self.bal[self.earn] = 10_000, 40_000
        self.s.commit()

    def teardown(self):
        if hasattr(self, "s"):
            self.s.close()
            self.engine.dispose()

    def key(self, what):
        self.n += 1
        return f"{what}-{self.n}"

    def pending(self, acct):
        return sum(u["amount"] for u in self.unbond.values() if u["acct"] == acct and u["paid"] is None)

    @rule(i=st.integers(0, 1), amount=st.integers(1, 10_000))
    def deposit(self, i, amount):
        acct, k = self.stakes[i], self.key("dep")
        self.bal[acct] += amount
        assert deposit_stake(self.s, acct, amount, idempotency_key=k) == self.bal[acct]
        self.replays.append((lambda: deposit_stake(self.s, acct, amount, idempotency_key=k), self.bal[acct]))

    @rule(i=st.integers(0, 1), amount=st.integers(1, 8_000))
    def unbond_request(self, i, amount):
        acct, k = self.stakes[i], self.key("unbond")
        free = self.bal[acct] - self.pending(acct)
        try:
            u = request_unbond(self.s, acct, amount, idempotency_key=k, policy=POLICY, now=self.now)
        except InsufficientFunds:
            assert free < amount
            return
        assert free >= amount and u.matures_at == self.now + POLICY.unbonding_delay
        self.unbond[u.id] = {"acct": acct, "amount": amount, "matures": u.matures_at, "paid": None}
        self.replays.append((lambda: request_unbond(self.s, acct, amount, idempotency_key=k, policy=POLICY,
                                                    now=self.now).id, u.id))

    @rule(i=st.integers(0, 1), amount=st.integers(1, 12_000), comp=st.lists(st.integers(0, 4_000), max_size=2),
          partial=st.booleans())
    def do_slash(self, i, amount, comp, partial):
        acct, k = self.stakes[i], self.key("slash")
        comp = comp[:len(self.buyers)]
        if sum(comp) > amount:
            return
        refunds = list(zip(self.buyers, comp))
        try:
            r = slash(self.s, acct, amount, refunds=refunds, idempotency_key=k, allow_partial=partial)
        except InsufficientFunds:
            assert not partial and self.bal[acct] < amount
            return
        taken = min(amount, self.bal[acct])
        assert r.slashed == taken and r.to_buyers + r.to_platform == taken
        left = taken
        for b, x in refunds:
            got = min(x, left)
            self.bal[b] += got
            left -= got
        self.bal[acct] -= taken
        self.replays.append((lambda: slash(self.s, acct, amount, refunds=refunds, idempotency_key=k,
                                           allow_partial=partial), r))

    @rule(minutes=st.integers(0, 150))
    def withdraw(self, minutes):
        self.now += timedelta(minutes=minutes)
        paid = dict(withdraw_matured(self.s, self.now))
        due = sorted(uid for uid, u in self.unbond.items() if u["paid"] is None and u["matures"] <= self.now)
        assert sorted(paid) == due
        for uid in due:  # in id order, each capped at what the stake still holds
            u = self.unbond[uid]
            expect = min(u["amount"], self.bal[u["acct"]])
            assert paid[uid] == expect
            u["paid"] = expect
            self.bal[u["acct"]] -= expect

    @rule(share=st.integers(1, 3), everything=st.booleans())
    def payout(self, share, everything):
        if self.bal[self.earn] == 0:
            return
        k = self.key("payout")
        amount = None if everything else max(1, self.bal[self.earn] // share)
        r = request_payout(self.s, self.earn, amount, idempotency_key=k)
        self.bal[self.earn] -= r.amount
        assert r.balance == self.bal[self.earn]
        self.replays.append((lambda: request_payout(self.s, self.earn, amount, idempotency_key=k), r))

    @precondition(lambda self: self.replays)
    @rule(data=st.data())
    def replay(self, data):
        call, first = data.draw(st.sampled_from(self.replays))
        assert call() == first

    @rule()
    def commit(self):
        self.s.commit()

    @invariant()
    def books(self):
        if not hasattr(self, "s"):
            return
        assert total_balance(self.s) == 0
        balances = dict(self.s.exec(select(LedgerAccount.id, LedgerAccount.balance)).all())
        for acct, expected in self.bal.items():
            assert balances[acct] == expected >= 0
        for acct in self.stakes:
            assert bonded_stake(self.s, acct) == max(0, self.bal[acct] - self.pending(acct))
        rows = {u.id: u for u in self.s.exec(select(LedgerUnbonding))}
        for uid, u in self.unbond.items():
            row = rows[uid]
            if u["paid"] is None:
                assert row.state == UnbondingState.PENDING and row.withdrawn_amount == 0
            else:
                assert row.state == UnbondingState.WITHDRAWN and row.withdrawn_amount == u["paid"] <= u["amount"]


StakeMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestStakeProperties = StakeMachine.TestCase
