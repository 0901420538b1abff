"""The price-performance policy on hand-built snapshots."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.routing import DEFAULT_POLICY, Decision, NodeState, PendingRequest, available_policies, get_policy

M = "llama-8b"
CHEAP, MID, DEAR = 100_000_000, 300_000_000, 900_000_000  # nano-$ per Mtok


def node(id, price_out, tps, region="us-east", free=4, **kw) -> NodeState:
    return NodeState(id=id, model=M, price_in=price_out // 4, price_out=price_out, tokens_per_s=tps,
                     region=region, free_slots=free, ttft_ms=kw.pop("ttft_ms", 100.0), **kw)


def req(id="r", **kw) -> PendingRequest:
    base = dict(model=M, prompt_tokens=200, max_tokens=200, region="us-east")
    base.update(kw)
    return PendingRequest(id=id, **base)


def route(reqs, nodes) -> Decision:
    return get_policy("price_performance").route(reqs, nodes)


def test_default_and_registry():
    assert DEFAULT_POLICY == "price_performance"
    assert get_policy().name == "price_performance"
    names = set(available_policies())
    assert {"price_performance", "greedy", "random", "round_robin", "least_loaded", "cheapest_first",
            "inverse_square_price"} <= names
    with pytest.raises(ValueError, match="unknown routing policy"):
        get_policy("nope")


FLEET = [node("cheap-slow", CHEAP, 20.0), node("mid", MID, 60.0), node("dear-fast", DEAR, 200.0, ttft_ms=30.0)]


@pytest.mark.parametrize(
    "sort,expected",
    [("price", "cheap-slow"), ("throughput", "dear-fast"), ("latency", "dear-fast"), (None, "cheap-slow")],
)
def test_sort_orders(sort, expected):
    d = route([req(sort=sort)], FLEET)
    assert d.assignments == {"r": expected}


def test_balanced_pays_a_little_for_much_more_speed():
    nodes = [node("a", 100_000_000, 10.0), node("b", 105_000_000, 100.0)]
    assert route([req()], nodes).assignments == {"r": "b"}
    assert route([req(sort="price")], nodes).assignments == {"r": "a"}


def test_max_price_filters_and_explains():
    d = route([req(max_price=MID)], [node("dear", DEAR, 100.0), node("mid", MID, 50.0)])
    assert d.assignments == {"r": "mid"}
    d = route([req(max_price=CHEAP)], [node("dear", DEAR, 100.0), node("mid", MID, 50.0)])
    assert not d.assignments and "max_price" in d.rejections["r"]


def test_latency_targets():
    nodes = [node("slow", CHEAP, 20.0, ttft_ms=900.0), node("fast", DEAR, 120.0, ttft_ms=50.0)]
    assert route([req(min_tokens_per_s=50)], nodes).assignments == {"r": "fast"}
    assert route([req(max_ttft_ms=500)], nodes).assignments == {"r": "fast"}
    d = route([req(min_tokens_per_s=500)], nodes)
    assert "min_tokens_per_s" in d.rejections["r"] and "fastest 120.0" in d.rejections["r"]
    d = route([req(max_ttft_ms=20)], nodes)
    assert "max_ttft_ms" in d.rejections["r"]


def test_waiting_counts_against_ttft():
    nodes = [node("n", CHEAP, 50.0, ttft_ms=100.0)]
    assert route([req(max_ttft_ms=500)], nodes).assignments == {"r": "n"}
    d = route([req(max_ttft_ms=500, waited_ms=450)], nodes)
    assert "after 450 ms queued" in d.rejections["r"]


def test_region_rtt_and_required_region():
    far = node("far", CHEAP, 50.0, region="ap-southeast")
    near = node("near", CHEAP, 50.0, region="us-east")
    # same price and speed: the nearer node wins on latency
    assert route([req(region="us-east")], [far, near]).assignments == {"r": "near"}
    # an ap-southeast buyer with a tight TTFT target cannot use us-east (220 ms RTT)
    assert route([req(region="ap-southeast", max_ttft_ms=200)], [far, near]).assignments == {"r": "far"}
    d = route([req(region="eu-west", require_region=True)], [far, near])
    assert "required region 'eu-west'" in d.rejections["r"]


def test_combined_constraints_reason():
    nodes = [node("cheap-slow", CHEAP, 10.0), node("dear-fast", DEAR, 100.0)]
    d = route([req(max_price=MID, min_tokens_per_s=50)], nodes)
    assert d.rejections["r"] == "no single node meets max_price and min_tokens_per_s together"


def test_unknown_model_and_offline():
    d = route([req(model="other")], FLEET)
    assert "no online node serves model 'other'" in d.rejections["r"]
    d = route([req()], [node("x", CHEAP, 50.0, online=False)])
    assert "no online node" in d.rejections["r"]


def test_capacity_spreads_a_burst_and_defers_the_rest():
    nodes = [node("cheap", CHEAP, 50.0, free=3), node("mid", MID, 50.0, free=2)]
    reqs = [req(f"r{i}") for i in range(7)]
    d = route(reqs, nodes)
    counts = {n: list(d.assignments.values()).count(n) for n in ("cheap", "mid")}
    assert counts == {"cheap": 3, "mid": 2}
    assert len(d.deferred) == 2 and not d.rejections


def test_regret_gives_the_contested_slot_to_who_loses_most():
    # one cheap slot; r-long has more tokens at stake, r-short loses little by moving
    nodes = [node("cheap", CHEAP, 50.0, free=1), node("dear", DEAR, 50.0, free=1)]
    d = route([req("r-short", max_tokens=10), req("r-long", max_tokens=2000)], nodes)
    assert d.assignments == {"r-long": "cheap", "r-short": "dear"}


def test_reputation_load_and_overclaim_multipliers():
    a = node("a", CHEAP, 50.0)
    b = node("b", CHEAP, 50.0, reputation=0.3)
    assert route([req()], [b, a]).assignments == {"r": "a"}
    c = node("c", CHEAP, 50.0, load=0.9)
    assert route([req()], [c, a]).assignments == {"r": "a"}
    liar = node("liar", int(CHEAP * 0.8), 50.0, advertised_tokens_per_s=150.0, claim_ratio=1 / 3)
    assert route([req()], [liar, a]).assignments == {"r": "a"}


def test_per_bucket_speeds_are_used():
    # fast on short prompts, slow on long ones (bucket 3: >= 4096 tokens)
    n1 = node("n1", CHEAP, 50.0, tokens_per_s_by_bucket=(80.0, 80.0, 80.0, 5.0))
    n2 = node("n2", MID, 40.0)
    d = route([req("short", min_tokens_per_s=30), req("long", prompt_tokens=6000, min_tokens_per_s=30)], [n1, n2])
    assert d.assignments == {"short": "n1", "long": "n2"}


def test_all_policies_respect_capacity_and_max_price():
    rng = np.random.default_rng(0)
    nodes = [node(f"n{i}", int(rng.integers(1, 9)) * 100_000_000, float(rng.uniform(10, 100)), free=2) for i in range(10)]
    reqs = [req(f"r{i}", max_price=500_000_000 if i % 3 == 0 else None) for i in range(30)]
    price = {n.id: n.price_out for n in nodes}
    for name in available_policies():
        d = get_policy(name).route(reqs, nodes)
        per_node = {}
        for rid, nid in d.assignments.items():
            per_node[nid] = per_node.get(nid, 0) + 1
        assert all(v <= 2 for v in per_node.values()), name
        for r in reqs:
            if r.max_price is not None and r.id in d.assignments:
                assert price[d.assignments[r.id]] <= r.max_price, name
        assert set(d.assignments) | set(d.rejections) | set(d.deferred) == {r.id for r in reqs}, name
