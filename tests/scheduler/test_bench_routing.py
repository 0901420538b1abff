"""The routing benchmark runs end to end and prints its JSON summary last (slow: ~25 s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_quick_prints_json_last():
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "routing.py"), "--quick"],
        capture_output=True, text=True, timeout=240, cwd=ROOT, check=True,
    ).stdout
    summary = json.loads(out.strip().splitlines()[-1])
    for key in ("cost_gap_vs_optimum", "slo_attainment", "cost_vs_round_robin", "cost_vs_least_loaded",
                "slo_vs_cheapest_first", "overclaim_share_drop", "dispatch_ms_10k_x_1k"):
        assert key in summary
    assert summary["slo_attainment"] >= 0.99
    assert summary["cost_vs_round_robin"] <= 0.7 and summary["cost_vs_least_loaded"] <= 0.7
    assert summary["slo_vs_cheapest_first"] > 0 and summary["overclaim_share_drop"] >= 0.8
    assert abs(summary["objective_gap_vs_optimum"]) <= 0.03


@pytest.mark.slow
def test_dispatch_10k_x_1k_places_everything():
    sys.path.insert(0, str(ROOT / "bench"))
    from routing import to_pending

    from scheduler.sim.fleet import build_fleet
    from scheduler.routing import get_policy
    from scheduler.sim.simulation import Simulation
    from scheduler.sim.traces import poisson_trace

    nodes = Simulation(build_fleet(1000, seed=7), get_policy()).node_states(0.0)
    reqs = to_pending(poisson_trace(10_000, 1e6, seed=8))
    d = get_policy().route(reqs, nodes)
    assert len(d.assignments) + len(d.rejections) + len(d.deferred) == 10_000
    assert len(d.assignments) >= 9_900  # 33k free slots: nearly all placed
