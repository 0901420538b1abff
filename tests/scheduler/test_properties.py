"""Property tests: whatever the market, the policy's decision is consistent and safe."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.latency import default_rtt_table
from scheduler.routing import NodeState, PendingRequest, get_policy

REGIONS = ["us-east", "eu-west", "ap-southeast"]

node_st = st.builds(
    lambda i, p, t, r, free, ttft, rep, load: NodeState(
        id=f"n{i}", model="m", price_in=p // 4, price_out=p, tokens_per_s=t, region=r, free_slots=free,
        ttft_ms=ttft, reputation=rep, load=load,
    ),
    st.integers(0, 10**6), st.integers(10**7, 10**9), st.floats(1.0, 300.0), st.sampled_from(REGIONS),
    st.integers(0, 4), st.floats(5.0, 800.0), st.floats(0.1, 1.0), st.floats(0.0, 1.0),
)
req_st = st.builds(
    lambda i, p, m, r, sort, price, ttft, tps, waited, strict: PendingRequest(
        id=f"r{i}", model="m", prompt_tokens=p, max_tokens=m, region=r, sort=sort, max_price=price,
        max_ttft_ms=ttft, min_tokens_per_s=tps, waited_ms=waited, require_region=strict and r is not None,
    ),
    st.integers(0, 10**6), st.integers(1, 9000), st.integers(1, 2000), st.sampled_from(REGIONS + [None]),
    st.sampled_from([None, "price", "throughput", "latency"]), st.none() | st.integers(10**7, 10**9),
    st.none() | st.floats(50.0, 3000.0), st.none() | st.floats(1.0, 200.0), st.floats(0.0, 500.0), st.booleans(),
)


def feasible(r: PendingRequest, n: NodeState) -> bool:
    """An independent re-statement of the hard constraints."""
    if not n.online or n.model != r.model:
        return False
    if r.max_price is not None and n.price_out > r.max_price:
        return False
    if r.require_region and n.region != r.region:
        return False
    if r.min_tokens_per_s is not None and n.tokens_per_s < r.min_tokens_per_s:
        return False
    if r.max_ttft_ms is not None:
        rtt = n.rtt_ms if r.region is None else default_rtt_table().rtt_ms(r.region, n.region)
        if rtt + n.ttft_ms > r.max_ttft_ms - r.waited_ms + 1e-3:
            return False
    return True


def unique_ids(items):
    return list({x.id: x for x in items}.values())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(node_st, min_size=1, max_size=6), st.lists(req_st, min_size=1, max_size=25),
       st.sampled_from(["price_performance", "price_performance", "cheapest_first", "random"]))
def test_decision_is_consistent_and_safe(nodes, reqs, policy):
    nodes, reqs = unique_ids(nodes), unique_ids(reqs)
    d = get_policy(policy).route(reqs, nodes)
    ids = [r.id for r in reqs]
    outcome = list(d.assignments) + list(d.rejections) + list(d.deferred)
    assert sorted(outcome) == sorted(ids)  # each request exactly once
    by_id = {n.id: n for n in nodes}
    used = Counter(d.assignments.values())
    assert all(used[nid] <= by_id[nid].free_slots for nid in used)
    if policy != "price_performance":
        return
    rq = {r.id: r for r in reqs}
    for rid, nid in d.assignments.items():
        assert feasible(rq[rid], by_id[nid])
    for rid, reason in d.rejections.items():
        assert not any(feasible(rq[rid], n) for n in nodes), reason
        assert any(c in reason for c in ("max_price", "max_ttft_ms", "min_tokens_per_s", "region", "model"))
    for rid in d.deferred:  # feasible somewhere, but every feasible node is full
        options = [n for n in nodes if feasible(rq[rid], n)]
        assert options
        assert all(used[n.id] >= n.free_slots for n in options)
