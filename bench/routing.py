"""Routing benchmark: the price-performance policy vs baselines and vs the LP optimum.

    .venv/bin/python bench/routing.py [--quick] [--seed N]

1. Fleet simulation (same fleet, same Poisson and bursty traces, every policy):
   cost per Mtok (prompt + output tokens, what buyers paid), SLO attainment (share of
   requests that got their first token within max_ttft_ms and streamed at least
   min_tokens_per_s; rejections count as misses), p50/p99 end-to-end latency.
2. Over-claimers: their share of assignments after the first 200, learning on, against
   the share the same run gives them when the router believes their claims (learning off).
3. Offline optimum: burst snapshots (a fleet at rest with learned speeds, a burst of
   requests filling ~70% of the free slots), the policy's assignment vs the LP optimum of
   the same objective, and vs the pure min-cost LP under the same hard constraints.
4. Dispatch time per batch at 10,000 pending × 1,000 nodes (and a smaller size).
5. Cache-aware routing: multi-turn chat conversations (growing context, think time) over
   background single-turn traffic; every node keeps a prefix KV cache sized by its memory
   (LRU). The price-performance policy with affinity hints (`PendingRequest.cached_tokens`,
   as the coordinator's prefix map gives them) vs the same policy without, same fleet, trace
   and seed: `affinity_ttft_gain` = median TTFT of turns 2+ without ÷ with;
   `affinity_max_util_increase` = the busiest node's utilisation with minus without. The
   `affinity` weight is calibrated on some seeds (the best pooled gain whose utilisation rise
   stays ≤ 0.1) and reported on others (`affinity_calibration_seeds`, `affinity_report_seeds`).

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# One BLAS thread: the score products are thin (K≈16); on a shared 2-core box BLAS threads
# oversubscribe and make dispatch time erratic (4× slower). Workers should do the same.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.sim.fleet import build_fleet  # noqa: E402
from scheduler.sim.optimum import optimum, solve_assignment  # noqa: E402
from scheduler.policies import PricePerformancePolicy  # noqa: E402
from scheduler.routing import PendingRequest, get_policy  # noqa: E402
from scheduler.scoring import score_matrix  # noqa: E402
from scheduler.sim.simulation import MODEL, Simulation, share  # noqa: E402
from scheduler.scoring import ScoreWeights  # noqa: E402
from scheduler.sim.traces import bursty_trace, conversation_trace, poisson_trace  # noqa: E402
from results import emit  # noqa: E402  (bench/results.py)

POLICIES = ["price_performance", "cheapest_first", "inverse_square_price", "least_loaded", "round_robin", "random"]


def pooled(results) -> dict:
    outcomes = [o for r in results for o in r.outcomes]
    served = [o for o in outcomes if o.end_ms is not None]
    tokens = sum(o.request.prompt_tokens + o.tokens for o in served)
    lat = np.array([o.end_ms - o.request.arrival_ms for o in served])
    return {
        "cost_per_mtok_usd": sum(o.cost_nano for o in served) / max(tokens, 1) / 1e3,
        "slo_attainment": sum(o.slo_met for o in outcomes) / len(outcomes),
        "p50_latency_ms": float(np.percentile(lat, 50)),
        "p99_latency_ms": float(np.percentile(lat, 99)),
        "rejected": sum(o.rejected is not None for o in outcomes),
    }


def to_pending(trace, waited: float = 0.0) -> list[PendingRequest]:
    return [
        PendingRequest(
            id=r.id, model=MODEL, prompt_tokens=r.prompt_tokens, max_tokens=r.max_tokens, region=r.region,
            sort=r.sort, max_price=r.max_price, max_ttft_ms=r.max_ttft_ms, min_tokens_per_s=r.min_tokens_per_s,
            waited_ms=waited,
        )
        for r in trace
    ]


def snapshot_gaps(sim: Simulation, n_snapshots: int, seed: int) -> dict:
    """Policy vs LP optima on burst snapshots. Three references:
    - `lp`: the same objective as the policy (preference-weighted score with reputation,
      load and honesty multipliers), the optimum of *this* assignment problem;
    - `lp_cost`: minimum money under the same hard constraints, ignoring buyers' sort
      preferences and the over-claim penalty (a lower bound no honest router reaches);
    - `lp_seekers`: minimum money for the cost-seeking requests (default or sort=price),
      with the other requests where the policy put them and over-claiming nodes (measured
      < 80% of claim) excluded, as the policy's penalty all but excludes them.
    """
    policy = PricePerformancePolicy()
    nodes = [n for n in sim.node_states(0.0) if n.online]
    slots = sum(n.free_slots for n in nodes)
    money = dict.fromkeys(("ours", "lp", "lp_cost", "ours_seekers", "lp_seekers"), 0.0)
    obj = {"ours": 0.0, "lp": 0.0}
    t_lp = 0.0
    for k in range(n_snapshots):
        reqs = to_pending(poisson_trace(int(0.7 * slots), 1e6, seed=seed + 100 + k))
        _, plans = policy.plan(reqs, nodes)
        snap, choice = plans[0].snapshot, plans[0].choice
        S = score_matrix(snap).astype(np.float64)
        cost = (snap.prompt[:, None] * snap.price_in[None, :] + snap.max_tokens[:, None] * snap.price_out[None, :]) / 1e6
        C = np.where(np.isfinite(S), cost, np.inf)
        t0 = time.perf_counter()
        best = optimum(snap, "score")
        cheapest = optimum(snap, "cost")
        seek = np.array([r.sort in (None, "price") for r in reqs])
        cap = snap.free.copy()
        fixed = np.flatnonzero(~seek & (choice >= 0))
        np.subtract.at(cap, choice[fixed], 1)
        honest = np.array([(n.claim_ratio or 1.0) >= 0.8 for n in snap.nodes])
        rows = np.flatnonzero(seek)
        seekers = solve_assignment(np.where(honest[None, :], C[rows], np.inf), cap)
        t_lp += time.perf_counter() - t0

        def total(M, r, ch):
            ok = ch >= 0
            return float(M[r[ok], ch[ok]].sum()), int(ok.sum())

        everyone = np.arange(len(reqs))
        for name, ch in (("ours", choice), ("lp", best), ("lp_cost", cheapest)):
            money[name] += total(C, everyone, ch)[0]
        obj["ours"] += total(S * snap.cost_ref[:, None], everyone, choice)[0]
        obj["lp"] += total(S * snap.cost_ref[:, None], everyone, best)[0]
        money["ours_seekers"] += total(C, rows, choice[rows])[0]
        money["lp_seekers"] += total(C, rows, seekers)[0]
        assert (best >= 0).sum() == (choice >= 0).sum() == (cheapest >= 0).sum(), "all place the same count"
    return {
        "cost_gap_vs_optimum": money["ours"] / money["lp"] - 1.0,
        "objective_gap_vs_optimum": obj["ours"] / obj["lp"] - 1.0,
        "cost_gap_vs_min_cost_lp": money["ours"] / money["lp_cost"] - 1.0,
        "cost_gap_vs_min_cost_lp_seekers": money["ours_seekers"] / money["lp_seekers"] - 1.0,
        "lp_seconds": t_lp, "snapshot_requests": int(0.7 * slots), "snapshot_nodes": len(nodes),
    }


def dispatch_ms(n_req: int, n_nodes: int, seed: int, repeats: int) -> float:
    fleet = build_fleet(n_nodes, seed=seed + 7)
    sim = Simulation(fleet, get_policy("price_performance"))
    nodes = sim.node_states(0.0)
    reqs = to_pending(poisson_trace(n_req, 1e6, seed=seed + 8))
    policy = get_policy("price_performance")
    policy.route(reqs, nodes)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        policy.route(reqs, nodes)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


AFFINITY_WEIGHTS = (0.5, 1.0, 2.0, 4.0)


def affinity_runs(seed: int, weights, n_nodes: int, n_conv: int, background_per_s: float) -> dict:
    """One fleet and trace: the policy without affinity (weight 0) and with each weight."""
    fleet = build_fleet(n_nodes, seed=seed + 1)
    chats = conversation_trace(n_conv, 2.0, seed=seed + 5)
    horizon_s = max(r.arrival_ms for r in chats) / 1000.0 + 60.0
    background = poisson_trace(int(background_per_s * horizon_s), background_per_s, seed=seed + 6)
    trace = sorted(chats + background, key=lambda r: r.arrival_ms)
    out = {}
    for w in (0.0, *weights):
        policy = PricePerformancePolicy(ScoreWeights(affinity=w))
        res = Simulation(fleet, policy, seed=seed + 10, prefix_cache=True, affinity=w > 0).run(trace)
        later = [o for o in res.outcomes if o.request.turn > 0 and o.first_token_ms is not None]
        out[w] = {
            "ttft": np.array([o.first_token_ms - o.request.arrival_ms for o in later]),
            "hit": np.array([o.cached_tokens > 0 for o in later]),
            "max_util": max(res.utilisation),
            "cost": sum(o.cost_nano for o in res.outcomes),
        }
    return out


def affinity_summary(runs: list[dict], w: float) -> dict:
    base = np.concatenate([r[0.0]["ttft"] for r in runs])
    with_ = np.concatenate([r[w]["ttft"] for r in runs])
    return {
        "gain": float(np.median(base) / np.median(with_)),
        "mean_gain": float(base.mean() / with_.mean()),
        "p90_gain": float(np.percentile(base, 90) / np.percentile(with_, 90)),
        "util_increase": max(r[w]["max_util"] - r[0.0]["max_util"] for r in runs),
        "hit_with": float(np.concatenate([r[w]["hit"] for r in runs]).mean()),
        "hit_without": float(np.concatenate([r[0.0]["hit"] for r in runs]).mean()),
        "median_ms": (float(np.median(base)), float(np.median(with_))),
        "cost_ratio": sum(r[w]["cost"] for r in runs) / sum(r[0.0]["cost"] for r in runs),
    }


def affinity_bench(quick: bool, seed: int) -> dict:
    n_nodes, n_conv, bg = 60, 120, 20.0
    calib = [seed] if quick else [seed, seed + 1]
    report = [seed + 2, seed + 3] if quick else [seed + 2, seed + 3, seed + 4, seed + 5]
    weights = (1.0, 2.0) if quick else AFFINITY_WEIGHTS
    cal_runs = [affinity_runs(k, weights, n_nodes, n_conv, bg) for k in calib]
    scored = {w: affinity_summary(cal_runs, w) for w in weights}
    ok = [w for w in weights if scored[w]["util_increase"] <= 0.1] or list(weights)
    best = max(ok, key=lambda w: (scored[w]["mean_gain"], -w))
    rep_runs = [affinity_runs(k, (best,), n_nodes, n_conv, bg) for k in report]
    per_seed = [affinity_summary([r], best)["gain"] for r in rep_runs]
    return {"weight": best, "calibration": {w: round(v["mean_gain"], 3) for w, v in scored.items()},
            "calib_seeds": calib, "report_seeds": report, "per_seed_gain": per_seed,
            "turns": int(sum(len(r[0.0]["ttft"]) for r in rep_runs)), **affinity_summary(rep_runs, best)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t_start = time.perf_counter()
    n_nodes, n_req, rate = (60, 2000, 60.0) if args.quick else (120, 6000, 120.0)
    fleet = build_fleet(n_nodes, seed=args.seed + 1)
    over = {n.id for n in fleet if n.overclaims}
    traces = [poisson_trace(n_req, rate, seed=args.seed + 2), bursty_trace(n_req, rate, seed=args.seed + 3)]
    print(f"fleet {n_nodes} nodes ({len(over)} over-claiming, {sum(n.mtbf_s is not None for n in fleet)} failing), "
          f"traces: Poisson + bursty, {n_req} requests each at {rate:.0f}/s")
    table, runs = {}, {}
    for name in POLICIES:
        results = []
        for k, tr in enumerate(traces):
            sim = Simulation(fleet, get_policy(name), seed=args.seed + 10 + k)
            results.append(sim.run(tr))
            if name == "price_performance" and k == 0:
                learned = sim
        table[name] = pooled(results)
        runs[name] = results
    print(f"{'policy':22s} {'$/Mtok':>8s} {'SLO':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'rejected':>8s}")
    for name, m in table.items():
        print(f"{name:22s} {m['cost_per_mtok_usd']:8.4f} {m['slo_attainment']:7.3%} {m['p50_latency_ms']:8.0f} "
              f"{m['p99_latency_ms']:8.0f} {m['rejected']:8d}")

    # Over-claimers: learning on vs believing the claims, same trace, after the first 200.
    frozen = [Simulation(fleet, get_policy("price_performance"), seed=args.seed + 10 + k, learn=False).run(tr)
              for k, tr in enumerate(traces)]
    after_on = np.mean([share(r.dispatch_log, over, 200) for r in runs["price_performance"]])
    after_off = np.mean([share(r.dispatch_log, over, 200) for r in frozen])
    first_on = np.mean([share(r.dispatch_log, over, 0, 200) for r in runs["price_performance"]])
    drop = 1.0 - after_on / after_off if after_off > 0 else 0.0
    print(f"over-claimers' share: believed {after_off:.3f}, learned: first 200 {first_on:.3f}, after {after_on:.3f}"
          f" (drop {drop:.1%})")

    gaps = snapshot_gaps(learned, 2, args.seed)
    print(f"LP optimum on burst snapshots ({gaps['snapshot_requests']} requests × {gaps['snapshot_nodes']} nodes): "
          f"cost gap vs same-objective LP {gaps['cost_gap_vs_optimum']:+.2%}, vs min-cost LP "
          f"{gaps['cost_gap_vs_min_cost_lp']:+.2%} (cost seekers, honest nodes: "
          f"{gaps['cost_gap_vs_min_cost_lp_seekers']:+.2%}); objective gap {gaps['objective_gap_vs_optimum']:+.2%} "
          f"(LP {gaps['lp_seconds']:.1f} s)")

    reps = 5 if args.quick else 9
    small = dispatch_ms(1000, 100, args.seed, reps)
    mid = dispatch_ms(3000, 300, args.seed, reps)
    big = dispatch_ms(10000, 1000, args.seed, reps)
    print(f"dispatch per batch: 1k×100 {small:.1f} ms (DA + auction), 3k×300 {mid:.1f} ms and 10k×1k {big:.1f} ms "
          f"(sampled prices + chunked DA: {big / mid:.1f}× time for {10000 * 1000 / (3000 * 300):.0f}× pairs)")

    aff = affinity_bench(args.quick, args.seed)
    print(f"cache affinity (weight {aff['weight']} from seeds {aff['calib_seeds']}, mean-TTFT gain by weight "
          f"{aff['calibration']}; reported on seeds {aff['report_seeds']}, {aff['turns']} turns 2+): median TTFT "
          f"{aff['median_ms'][0]:.0f} -> {aff['median_ms'][1]:.0f} ms (x{aff['gain']:.2f}; per seed "
          f"{[round(g, 2) for g in aff['per_seed_gain']]}), mean x{aff['mean_gain']:.2f}, p90 x{aff['p90_gain']:.2f}, "
          f"cache hits {aff['hit_without']:.0%} -> {aff['hit_with']:.0%}, busiest node's utilisation "
          f"{aff['util_increase']:+.3f}, cost x{aff['cost_ratio']:.3f}")

    pp, rr, ll, cf = (table[k] for k in ("price_performance", "round_robin", "least_loaded", "cheapest_first"))
    out = {
        "cost_gap_vs_optimum": round(gaps["cost_gap_vs_optimum"], 4),
        "cost_gap_vs_min_cost_lp": round(gaps["cost_gap_vs_min_cost_lp"], 4),
        "objective_gap_vs_optimum": round(gaps["objective_gap_vs_optimum"], 4),
        "cost_gap_vs_min_cost_lp_seekers": round(gaps["cost_gap_vs_min_cost_lp_seekers"], 4),
        "slo_attainment": round(pp["slo_attainment"], 4),
        "cost_vs_round_robin": round(pp["cost_per_mtok_usd"] / rr["cost_per_mtok_usd"], 4),
        "cost_vs_least_loaded": round(pp["cost_per_mtok_usd"] / ll["cost_per_mtok_usd"], 4),
        "slo_vs_round_robin": round(pp["slo_attainment"] - rr["slo_attainment"], 4),
        "slo_vs_least_loaded": round(pp["slo_attainment"] - ll["slo_attainment"], 4),
        "slo_vs_cheapest_first": round(pp["slo_attainment"] - cf["slo_attainment"], 4),
        "cost_vs_cheapest_first": round(pp["cost_per_mtok_usd"] / cf["cost_per_mtok_usd"], 4),
        "overclaim_share_drop": round(drop, 4),
        "dispatch_ms_10k_x_1k": round(big, 2),
        "dispatch_ms_3k_x_300": round(mid, 2),
        "dispatch_ms_1k_x_100": round(small, 2),
        "affinity_ttft_gain": round(aff["gain"], 3),
        "affinity_max_util_increase": round(aff["util_increase"], 4),
        "affinity_mean_ttft_gain": round(aff["mean_gain"], 3),
        "affinity_p90_ttft_gain": round(aff["p90_gain"], 3),
        "affinity_ttft_gain_per_seed": [round(g, 3) for g in aff["per_seed_gain"]],
        "affinity_cache_hit_share": round(aff["hit_with"], 4),
        "affinity_cache_hit_share_without": round(aff["hit_without"], 4),
        "affinity_cost_ratio": round(aff["cost_ratio"], 4),
        "affinity_weight": aff["weight"],
        "affinity_calibration_seeds": aff["calib_seeds"],
        "affinity_report_seeds": aff["report_seeds"],
        "cost_per_mtok_usd": {k: round(v["cost_per_mtok_usd"], 4) for k, v in table.items()},
        "slo": {k: round(v["slo_attainment"], 4) for k, v in table.items()},
        "p99_latency_ms": {k: round(v["p99_latency_ms"]) for k, v in table.items()},
        "quick": args.quick,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    emit("routing", out)


if __name__ == "__main__":
    main()
