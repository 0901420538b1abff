"""Cache-aware routing: a node that holds a request's prompt prefix is preferred for the
prefill time it saves, inside the same score as price, latency and load — only while it has
room, meets the latency target and is not much dearer — and the simulator's multi-turn
conversation traces and node-side prefix caches."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from scheduler.estimates import BUCKET_MIDPOINTS
from scheduler.policies import PricePerformancePolicy
from scheduler.routing import (
    GreedyPolicy,
    NodeState,
    PendingRequest,
    affinity_saving_ms,
    prefill_ms_per_token,
)
from scheduler.scoring import ScoreWeights, build_snapshot, score_matrix
from scheduler.shortlist import shortlist
from scheduler.sim.fleet import build_fleet
from scheduler.sim.simulation import Simulation
from scheduler.sim.traces import conversation_trace

PREFILL = 2000.0  # tok/s: a 4,000-token prompt costs 2 s of prefill


def _node(nid: str, **kw) -> NodeState:
    ttft = tuple(50.0 + 1000.0 * m / PREFILL for m in BUCKET_MIDPOINTS)
    base = dict(id=nid, model="m", price_in=100_000_000, price_out=400_000_000, tokens_per_s=60.0,
                region="us-east", free_slots=4, ttft_ms=ttft[1], ttft_ms_by_bucket=ttft,
                tokens_per_s_by_bucket=(60.0,) * 4)
    base.update(kw)
    return NodeState(**base)


def _turn(rid: str = "r2", held: tuple = (("b", 3900),), **kw) -> PendingRequest:
    base = dict(id=rid, model="m", prompt_tokens=4000, max_tokens=256, region="us-east", max_ttft_ms=5000.0,
                cached_tokens=held)
    base.update(kw)
    return PendingRequest(**base)


def _route(reqs, nodes, policy=None):
    return (policy or PricePerformancePolicy()).route(reqs, nodes).assignments


def test_the_holder_wins_when_both_are_free_and_equal():
    nodes = [_node("a"), _node("b")]
    assert _route([_turn(held=())], nodes)["r2"] == "a"  # without a hint, the tie goes to the first
    assert _route([_turn()], nodes)["r2"] == "b"
    assert _route([_turn(sort="latency")], nodes)["r2"] == "b"
    assert GreedyPolicy().route([_turn(sort="latency")], nodes).assignments["r2"] == "b"


def test_a_full_holder_loses_to_a_free_node():
    nodes = [_node("a"), _node("b", free_slots=0, load=1.0)]
    d = PricePerformancePolicy().route([_turn()], nodes)
    assert d.assignments["r2"] == "a" and not d.deferred
    # a burst: the holder's one slot goes to one request, the others elsewhere, none waits
    nodes = [_node("a"), _node("b", free_slots=1)]
    reqs = [_turn(f"r{i}") for i in range(3)]
    got = PricePerformancePolicy().route(reqs, nodes).assignments
    assert sorted(got.values()).count("b") == 1 and len(got) == 3


def test_a_holder_far_over_the_latency_target_loses():
    slow = tuple(t * 20 for t in _node("x").ttft_ms_by_bucket)  # ~40 s for this prompt uncached
    nodes = [_node("a"), _node("b", ttft_ms_by_bucket=slow, ttft_ms=slow[1])]
    assert _route([_turn()], nodes)["r2"] == "a"  # the saving never makes a target look met


def test_a_much_dearer_holder_loses_and_a_slightly_dearer_one_wins():
    dear = [_node("a"), _node("b", price_in=300_000_000, price_out=1_200_000_000)]
    assert _route([_turn()], dear)["r2"] == "a"
    close = [_node("a"), _node("b", price_in=105_000_000, price_out=420_000_000)]
    assert _route([_turn()], close)["r2"] == "b"


def test_the_saving_is_bounded_and_load_still_counts():
    b = _node("b")
    assert prefill_ms_per_token(b) == 1000.0 / PREFILL  # the slope of its TTFT buckets
    assert prefill_ms_per_token(replace(b, prefill_tokens_per_s=4000.0)) == 0.25
    assert affinity_saving_ms(_turn(), b) <= 0.9 * b.ttft_ms
    assert affinity_saving_ms(_turn(held=(("a", 100),)), b) == 0.0
    snap = build_snapshot([_turn()], [_node("a"), b])
    plain = build_snapshot([_turn(held=())], [_node("a"), b])
    s, s0 = score_matrix(snap)[0], score_matrix(plain)[0]
    assert s[0] == s0[0] and s0[1] * 0.5 <= s[1] < s0[1]  # at most half the pair's score
    off = build_snapshot([_turn()], [_node("a"), b], weights=ScoreWeights(affinity=0.0))
    assert np.array_equal(score_matrix(off)[0], s0)
    # a busy holder is discounted from its own, load-raised score: a near-full one still
    # loses to an idle node when the saving is small
    small = _turn(held=(("b", 300),))
    assert _route([small], [_node("a"), _node("b", load=1.0)])["r2"] == "a"


def test_the_shortlist_keeps_the_holder():
    rng = np.random.default_rng(0)
    nodes = [_node(f"n{i}", price_out=int(rng.integers(1, 9)) * 100_000_000) for i in range(800)]
    slow = tuple(t * 3 for t in nodes[0].ttft_ms_by_bucket)
    nodes[-1] = _node("holder", price_out=2_000_000_000, price_in=500_000_000, tokens_per_s=20.0,
                      tokens_per_s_by_bucket=(20.0,) * 4, ttft_ms_by_bucket=slow, ttft_ms=slow[1])
    req = _turn(held=(("holder", 3900),), region=None)
    assert "holder" in {n.id for n in shortlist(nodes, req, k=8)}
    assert "holder" not in {n.id for n in shortlist(nodes, replace(req, cached_tokens=()), k=8)}


def test_conversation_traces_grow_and_think():
    trace = conversation_trace(60, 2.0, seed=1)
    convs: dict[str, list] = {}
    for r in trace:
        convs.setdefault(r.conversation, []).append(r)
    assert len(convs) == 60 and all(len(turns) >= 4 for turns in convs.values())
    for turns in convs.values():
        assert [t.turn for t in turns] == list(range(len(turns)))
        assert turns[0].after is None and all(t.after == p.id for p, t in zip(turns, turns[1:]))
        # each turn's prompt holds the previous prompt and its answer, plus a new message
        assert all(t.prompt_tokens > p.prompt_tokens + p.output_tokens for p, t in zip(turns, turns[1:]))
        assert all(t.think_ms >= 1000.0 for t in turns[1:])


def test_the_simulator_caches_conversations_and_affinity_raises_hits():
    fleet = build_fleet(12, seed=3, failing_share=0.0)
    trace = conversation_trace(50, 2.0, seed=4, min_turns=4, max_turns=4)
    runs = {}
    for aff in (False, True):
        res = Simulation(fleet, PricePerformancePolicy(), seed=5, prefix_cache=True, affinity=aff).run(trace)
        by_id = {o.request.id: o for o in res.outcomes}
        for o in res.outcomes:  # a turn arrives after the previous one ended, plus its think time
            r = o.request
            if r.after is not None and by_id[r.after].end_ms is not None:
                assert r.arrival_ms == by_id[r.after].end_ms + r.think_ms
        later = [o for o in res.outcomes if o.request.turn > 0 and o.nodes]
        assert all(o.cached_tokens <= o.request.prompt_tokens for o in later)
        runs[aff] = (np.mean([o.cached_tokens > 0 for o in later]),
                     np.median([o.first_token_ms - o.request.arrival_ms for o in later]),
                     max(res.utilisation))
        assert all(0.0 <= u <= 1.0 for u in res.utilisation)
    assert runs[True][0] > runs[False][0]
    assert runs[True][1] <= runs[False][1]
    # no node cache: no hits at all
    res = Simulation(fleet, PricePerformancePolicy(), seed=5, affinity=True).run(trace)
    assert not any(o.cached_tokens for o in res.outcomes)
