"""Audit rate, verifier choice, reputation and the economics of cheating."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from scheduler.audit import (
    AuditPolicy, NodeHistory, ReputationPolicy, VerifierCandidate, cheating_economics,
    select_verifier, should_audit, update_reputation,
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
    picks = {select_verifier("n1", "opA", "tiny", _cands(), rng) for _ in range(200)}
    assert picks == {"n7", "n8"}
    assert select_verifier("n1", "opA", "tiny", _cands()[:6], rng) is None
    assert select_verifier("n8", "opG", "tiny-20m", _cands(), rng) == "n3"


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


def test_cheating_economics_shows_the_numbers():
    # 1,000 tokens at $2 per million: $0.002 per job = 2,000,000 nano-dollars.
    e = cheating_economics(price_out=2_000_000_000, tokens_per_job=1000, stake=100_000_000_000, audit_rate=0.03)
    assert e.gain_per_job == pytest.approx(2_000_000)
    assert e.expected_penalty_per_job == pytest.approx(0.03 * 0.99 * (100_000_000_000 + 2_000_000))
    assert e.deterrent and e.ratio >= 3
    small = cheating_economics(price_out=2_000_000_000, tokens_per_job=1000, stake=10_000_000, audit_rate=0.03)
    assert not small.deterrent
    again = cheating_economics(price_out=2_000_000_000, tokens_per_job=1000, stake=small.min_slash, audit_rate=0.03)
    assert again.deterrent and again.ratio == pytest.approx(3.0, rel=1e-6)
    at_min_rate = cheating_economics(price_out=2_000_000_000, tokens_per_job=1000, stake=10_000_000,
                                     audit_rate=small.min_audit_rate)
    assert at_min_rate.ratio == pytest.approx(3.0)
