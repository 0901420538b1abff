"""The simulator: deterministic, learns, and separates policies."""

from __future__ import annotations

import pytest

from scheduler.sim.fleet import build_fleet, load_catalog, roofline_tokens_per_s
from scheduler.routing import get_policy
from scheduler.sim.simulation import Simulation, share
from scheduler.sim.traces import bursty_trace, poisson_trace


def test_catalog_and_roofline():
    cat = load_catalog()
    assert len(cat) >= 4
    h100 = cat["H100-SXM"]
    assert roofline_tokens_per_s(h100, 8.0, 1.0) == pytest.approx(3.35e12 / 16e9)


def test_fleet_is_heterogeneous():
    fleet = build_fleet(80, seed=0)
    assert len({n.gpu for n in fleet}) >= 4 and len({n.region for n in fleet}) >= 3
    assert any(n.overclaims for n in fleet) and any(n.mtbf_s for n in fleet)
    for n in fleet:
        if n.overclaims:
            assert n.advertised_tokens_per_s > 1.5 * n.curve.single_stream_tps


def test_traces():
    p = poisson_trace(500, 50.0, seed=1)
    assert len(p) == 500 and all(a.arrival_ms <= b.arrival_ms for a, b in zip(p, p[1:]))
    assert 7_000 < p[-1].arrival_ms < 13_000
    assert {r.sort for r in p} == {None, "price", "throughput", "latency"}
    b = bursty_trace(500, 50.0, seed=1)
    assert len(b) == 500 and all(r.output_tokens <= r.max_tokens for r in b)


def run(policy: str, seed: int = 0, learn: bool = True, n: int = 400):
    fleet = build_fleet(30, seed=5, failing_share=0.1)
    res = Simulation(fleet, get_policy(policy), seed=seed, learn=learn).run(poisson_trace(n, 40.0, seed=6))
    return fleet, res


def test_simulation_is_deterministic():
    _, a = run("price_performance", seed=1)
    _, b = run("price_performance", seed=1)
    assert a.dispatch_log == b.dispatch_log
    assert a.metrics() == b.metrics()
    m = a.metrics()
    assert m["requests"] == 400 and m["served"] + m["rejected"] == 400


def test_price_performance_beats_round_robin_and_learns():
    fleet, pp = run("price_performance")
    _, rr = run("round_robin")
    mp, mr = pp.metrics(), rr.metrics()
    assert mp["cost_per_mtok_usd"] < 0.8 * mr["cost_per_mtok_usd"]
    assert mp["slo_attainment"] >= mr["slo_attainment"]
    over = {n.id for n in fleet if n.overclaims}
    _, frozen = run("price_performance", learn=False)
    assert share(pp.dispatch_log, over, 200) < 0.5 * share(frozen.dispatch_log, over, 200) + 1e-9


def test_failed_node_streams_continue_elsewhere_and_back_off():
    fleet = build_fleet(6, seed=2, overclaim_share=0.0, failing_share=0.0)
    fleet[0].mtbf_s = 3.0  # fails every few seconds
    for n in fleet[1:]:
        n.price_out, n.price_in = n.price_out * 5, n.price_in * 5  # node 0 is the cheap one everybody wants
    trace = poisson_trace(150, 10.0, seed=3)
    sim = Simulation(fleet, get_policy("price_performance"), seed=4)
    res = sim.run(trace)
    moved = [o for o in res.outcomes if len(o.nodes) > 1]
    assert moved, "some streams should have been cut by the failing node"
    for o in moved:
        assert o.nodes[0] == fleet[0].id and o.end_ms is not None
        assert o.tokens == o.request.output_tokens  # the buyer got the whole answer
    assert sim.failures[0] > 0 and sim.backoff.nodes[fleet[0].id].last_failure is not None
