"""Audit rate, verifier choice, reputation and the economics of cheating."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from scheduler.audit import (
    AuditPolicy, NodeHistory, ReputationPolicy, VerifierCandidate, VerifierPolicy, cheating_economics,
    deterrent_slash, select_verifier, should_audit, update_reputation,
)


def test_new_nodes_are_audited_heavily_and_the_rate_falls_with_history():
    p = AuditPolicy()
    assert p.rate(NodeHistory()) == 1.0
    rates = [p.rate(NodeHistory(jobs=1000, passes=k)) for k in (0, 20, 100, 500, 5000)]
    assert rates == sorted(rates, reverse=True)
    assert rates[-1] == pytest.approx(p.long_run_rate)
    assert p.long_run_rate <= 0.05


def test_a_failure_makes_every_job_audited_until_it_passes_again_and_raises_the_floor():
    p = AuditPolicy()
    h = NodeHistory(jobs=10_000, passes=5000)
    h = replace(h, failures=1, passes_since_failure=0)  # one failed audit
    assert p.rate(h) == 1.0
    h = replace(h, passes=h.passes + p.recheck_passes, passes_since_failure=p.recheck_passes)
    assert p.rate(h) == pytest.approx(p.floor + p.failure_floor_step)
    assert should_audit(p, NodeHistory(), 0.999) and not should_audit(p, NodeHistory(jobs=10**6, passes=10**6), 0.5)


def _cands():
    return [
        VerifierCandidate("n1", "opA", ["tiny"], 0.9),  # the audited node itself
        VerifierCandidate("n2", "opA", ["tiny"], 0.95),  # same operator
        VerifierCandidate("n3", "opB", ["tiny-20m"], 0.95),  # other model
        VerifierCandidate("n4", "opC", ["tiny"], 0.3),  # low reputation
        VerifierCandidate("n5", "opD", ["tiny"], 0.9, banned=True),
        VerifierCandidate("n6", "opE", ["tiny"], 0.9, online=False),
        VerifierCandidate("n7", "opF", ["tiny"], 0.8),
        VerifierCandidate("n8", "opG", ["tiny", "tiny-20m"], 0.99),
    ]


def test_verifier_is_never_the_node_or_its_operator_and_serves_the_model():
    rng = random.Random(0)
    anyone = VerifierPolicy(min_passes=0, min_reputation=0.7)
    picks = {select_verifier("n1", "opA", "tiny", _cands(), rng, anyone) for _ in range(200)}
    assert picks == {"n7", "n8"}
    assert select_verifier("n1", "opA", "tiny", _cands()[:6], rng, anyone) is None
    assert select_verifier("n8", "opG", "tiny-20m", _cands(), rng, anyone) == "n3"
    # a confirmation excludes the first verifier's operator too
    assert {select_verifier("n1", "opA", "tiny", _cands(), rng, anyone, exclude=["opF"]) for _ in range(50)} == {"n8"}


def test_only_nodes_that_earned_it_verify_and_trusted_ones_go_first_for_confirmations():
    rng = random.Random(1)
    fresh = VerifierCandidate("cheat", "opX", ["tiny"], 0.5)  # just joined: no audits passed, no stake
    proven = VerifierCandidate("proven", "opY", ["tiny"], 0.8, passes=12, stake=2_000)
    poor = VerifierCandidate("poor", "opZ", ["tiny"], 0.9, passes=50, stake=10)
    ops = VerifierCandidate("ops", "operator", ["tiny"], 0.5, trusted=True)
    policy = VerifierPolicy(min_passes=5, min_reputation=0.6, min_stake=1_000)
    picks = {select_verifier("n", "opA", "tiny", [fresh, proven, poor, ops], rng, policy) for _ in range(100)}
    assert picks == {"proven", "ops"}
    assert {select_verifier("n", "opA", "tiny", [proven, ops], rng, policy, prefer_trusted=True)
            for _ in range(20)} == {"ops"}
    assert select_verifier("n", "opA", "tiny", [fresh, poor], rng, policy) is None


def test_reputation_rises_on_passes_halves_on_failure_and_bans_after_repeats():
    rp = ReputationPolicy()
    r = rp.initial
    for _ in range(20):
        up = update_reputation(r, 0, True)
        assert up.reputation > r and not up.banned
        r = up.reputation
    down = update_reputation(r, 1, False)
    assert down.reputation == pytest.approx(r / 2) and not down.banned and down.routing_weight == down.reputation
    assert update_reputation(down.reputation, 3, False).banned
    assert update_reputation(0.08, 1, False).banned  # below the floor
    assert update_reputation(0.08, 1, False).routing_weight == 0.0


def test_the_slash_is_sized_so_that_cheating_loses_three_times_its_gain():
    for rate in (0.03, 0.2, 1.0):
        slash = deterrent_slash(2_000_000, rate)
        expected_penalty = rate * 0.99 * (slash + 2_000_000)
        assert expected_penalty >= 3 * 2_000_000 and expected_penalty < 3 * 2_000_000 + rate
    assert deterrent_slash(10, 1.0, floor=1_000_000) == 1_000_000


def test_cheating_economics_reports_what_the_code_slashes():
    # 1,000 tokens at $2 per million: $0.002 per job = 2,000,000 nano-dollars.
    e = cheating_economics(price_out=2_000_000_000, tokens_per_job=1000, stake=100_000_000_000, audit_rate=0.03)
    assert e.gain_per_job == pytest.approx(2_000_000)
    assert e.details["slash_wanted"] == deterrent_slash(2_000_000, 0.03)
    assert e.expected_penalty_per_job == pytest.approx(0.03 * 0.99 * (deterrent_slash(2_000_000, 0.03) + 2_000_000))
    assert e.deterrent and e.ratio == pytest.approx(3.0, rel=1e-6)
    small = cheating_economics(price_out=2_000_000_000, tokens_per_job=1000, stake=10_000_000, audit_rate=0.03)
    assert not small.deterrent and small.details["slash_capped_by_stake"]  # not enough stake to slash
    again = cheating_economics(price_out=2_000_000_000, tokens_per_job=1000, stake=small.min_slash, audit_rate=0.03)
    assert again.deterrent and again.ratio == pytest.approx(3.0, rel=1e-6)
    at_min_rate = cheating_economics(price_out=2_000_000_000, tokens_per_job=1000, stake=10_000_000,
                                     audit_rate=small.min_audit_rate)
    assert at_min_rate.ratio >= 3.0 - 1e-6


def test_a_reconnect_raises_the_audit_rate_for_the_next_jobs():
    p = AuditPolicy()
    settled = NodeHistory(jobs=5000, passes=1000)
    assert p.rate(settled) == pytest.approx(p.floor)
    fresh_session = replace(settled, session_jobs=0)
    assert p.rate(fresh_session) == pytest.approx(p.session_rate)
    assert 1 - (1 - p.session_rate) ** p.session_jobs >= 0.99  # a swap is seen within the session window
