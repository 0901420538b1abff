"""The score matrix: the lookup fast path and the general path agree; terms are right."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from scheduler.routing import NodeState, PendingRequest
from scheduler.scoring import build_snapshot, constraint_masks, expected_cost, expected_latency, score_matrix

REGIONS = ["us-east", "us-west", "eu-west", "ap-southeast", None]


def market(seed: int, R: int = 300, N: int = 40):
    rng = np.random.default_rng(seed)
    nodes = [
        NodeState(
            id=f"n{i}", model="m", price_in=int(p) // 4, price_out=int(p), tokens_per_s=float(t),
            region=REGIONS[i % 4], free_slots=5, ttft_ms=float(rng.uniform(30, 400)), rtt_ms=float(rng.uniform(5, 100)),
            tokens_per_s_by_bucket=tuple(float(t) * f for f in (1.0, 0.95, 0.9, 0.7)),
        )
        for i, (p, t) in enumerate(zip(rng.integers(1, 10, N) * 10**8, rng.uniform(5, 150, N)))
    ]
    reqs = [
        PendingRequest(
            id=f"r{i}", model="m", prompt_tokens=int(rng.integers(10, 9000)), max_tokens=int(rng.integers(10, 900)),
            region=REGIONS[i % 5], sort=[None, "price", "throughput", "latency"][i % 4],
            max_ttft_ms=[None, 300.0, 800.0, 2000.0][(i // 4) % 4], min_tokens_per_s=[None, 20.0, 60.0][(i // 3) % 3],
            max_price=[None, 5 * 10**8][(i // 7) % 2], require_region=(i % 11 == 0) and i % 5 != 4,
            waited_ms=float(rng.uniform(0, 200)),
        )
        for i in range(R)
    ]
    return reqs, nodes


def test_fast_and_general_paths_agree_with_the_masks():
    reqs, nodes = market(1)
    snap = build_snapshot(reqs, nodes)
    assert snap.constraint_table is not None
    feas = np.empty(len(reqs), bool)
    S = score_matrix(snap, feasible_out=feas, chunk=64)
    general = dataclasses.replace(snap, constraint_table=None, constraint_class=None)
    S2 = score_matrix(general, chunk=100)
    assert np.array_equal(np.isinf(S), np.isinf(S2))
    assert np.allclose(S[np.isfinite(S)], S2[np.isfinite(S2)], rtol=1e-5)
    viol = np.zeros(S.shape, bool)
    for m in constraint_masks(snap, np.arange(len(reqs))).values():
        viol |= m
    assert np.array_equal(viol, np.isinf(S))
    assert np.array_equal(feas, ~viol.all(axis=1))
    assert 0 < np.isinf(S).mean() < 1


def test_cost_and_latency_terms():
    n = NodeState(id="n", model="m", price_in=1_000_000_000, price_out=2_000_000_000, tokens_per_s=50.0,
                  region="eu-west", free_slots=1, ttft_ms=100.0)
    r = PendingRequest(id="r", model="m", prompt_tokens=1000, max_tokens=500, region="us-east")
    snap = build_snapshot([r], [n])
    zero = np.array([0])
    assert expected_cost(snap, zero, zero)[0] == pytest.approx((1000 * 1e9 + 500 * 2e9) / 1e6)  # nano-$ ($0.002)
    ttft, total = expected_latency(snap, zero, zero)
    assert ttft[0] == pytest.approx(75 + 100)  # RTT us-east↔eu-west + the node's measured TTFT
    assert total[0] == pytest.approx(ttft[0] + 500 / 50 * 1000)
