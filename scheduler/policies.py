"""The default routing policy: vectorised price-performance with latency targets.

Per model: build the request × node arrays (`scheduler.scoring`), score every pair in one
pass, assign under each node's free slots. The solver depends on the batch size (see
`PricePerformancePolicy._solve`): regret-priority deferred acceptance
(`scheduler.assignment`, which explains the choice) always, polished by Bertsekas'
auction (`scheduler.auction`, near-exact) for ordinary micro-batches, and preceded by
sampled clearing prices for huge bursts, where only the fast path fits the dispatch
budget. Requests with no feasible
node, ignoring capacity, are rejected with the constraint that failed; feasible requests
that found no free slot are deferred to the next micro-batch.

The node's `free_slots` is its share of the batch, sized by the dispatch task from the
node's measured throughput curve (`scheduler.batching.free_slots`), so a burst is spread
over nodes in proportion to what each sustains rather than dumped on the cheapest one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scheduler.assignment import assign, clearing_prices
from scheduler.auction import auction
from scheduler.latency import RttTable
from scheduler.routing import Decision, NodeState, PendingRequest, RoutingPolicy, register_policy
from scheduler.scoring import ScoreWeights, Snapshot, build_snapshot, constraint_masks, score_matrix


@dataclass
class ModelPlan:
    """One model group's arrays and outcome (used by the benchmark and the LP)."""

    snapshot: Snapshot
    choice: np.ndarray  # node column per request row, -1 = none
    feasible: np.ndarray  # any node satisfies the hard constraints (ignoring capacity)


def _total(C: np.ndarray, choice: np.ndarray) -> float:
    rows = np.flatnonzero(choice >= 0)
    return float(C[rows, choice[rows]].sum())


def _fill(S: np.ndarray, choice: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Place any unplaced request that still has a feasible node with a free slot."""
    left = capacity - np.bincount(choice[choice >= 0], minlength=len(capacity))
    for r in np.flatnonzero(choice < 0):
        row = np.where(left > 0, S[r], np.inf)
        j = int(row.argmin())
        if np.isfinite(row[j]):
            choice[r] = j
            left[j] -= 1
    return choice


def group_by_model(requests: list[PendingRequest], nodes: list[NodeState]):
    """Yield (model, requests, online nodes) in first-seen order of the requests' models."""
    models = {r.model for r in requests}
    groups: dict[str, list[PendingRequest]] = {}
    if len(models) == 1:
        groups[next(iter(models))] = list(requests)
    else:
        for r in requests:
            groups.setdefault(r.model, []).append(r)
    online: dict[str, list[NodeState]] = {}
    for n in nodes:
        if n.online:
            online.setdefault(n.model, []).append(n)
    for model, reqs in groups.items():
        yield model, reqs, online.get(model, [])


def explain(snap: Snapshot, rows: np.ndarray) -> list[str]:
    """Human-readable reason per infeasible row, naming the constraint that failed."""
    masks = constraint_masks(snap, rows)
    ttft = snap.x_ttft[rows] @ snap.y_ttft.T
    model = snap.requests[0].model
    out = []
    for k, r in enumerate(rows):
        req = snap.requests[r]
        alone = [name for name, m in masks.items() if m[k].all()]
        if "max_price" in alone:
            out.append(
                f"max_price {req.max_price} is below every {model!r} node's output price "
                f"(cheapest {int(snap.price_out.min())})"
            )
        elif "region" in alone:
            out.append(f"no online node for {model!r} in required region {req.region!r}")
        elif "min_tokens_per_s" in alone:
            fastest = float(snap.tps_nb[:, snap.bucket[r]].max())
            out.append(
                f"min_tokens_per_s {req.min_tokens_per_s} exceeds every node's measured speed "
                f"(fastest {fastest:.1f} tok/s)"
            )
        elif "max_ttft_ms" in alone:
            waited = f" after {req.waited_ms:.0f} ms queued" if req.waited_ms > 0 else ""
            out.append(
                f"max_ttft_ms {req.max_ttft_ms} unreachable{waited}: best expected time to "
                f"first token is {float(ttft[k].min()) + req.waited_ms:.0f} ms"
            )
        else:
            active = [name for name, m in masks.items() if m[k].any()]
            out.append(f"no single node meets {' and '.join(active)} together")
    return out


@register_policy
class PricePerformancePolicy(RoutingPolicy):
    """Cheapest tokens that meet the latency target, weighted by the buyer's preference,
    with reputation, load and claim honesty as multipliers."""

    name = "price_performance"
    auction_cells = 100_000  # up to this R × N, also run the auction and keep the better
    whole_matrix_cells = 300_000  # up to this, deferred acceptance on the whole batch at once
    sample_rows = 250  # above it: clearing prices from this many rows, then row chunks of
    chunk_rows = 64

    def __init__(self, weights: ScoreWeights | None = None, rtt: RttTable | None = None) -> None:
        self.weights = weights or ScoreWeights()
        self.rtt = rtt

    def plan(self, requests: list[PendingRequest], nodes: list[NodeState]) -> tuple[Decision, list[ModelPlan]]:
        decision = Decision()
        plans: list[ModelPlan] = []
        for model, reqs, model_nodes in group_by_model(requests, nodes):
            if not model_nodes:
                for r in reqs:
                    decision.rejections[r.id] = f"no online node serves model {model!r}"
                continue
            snap = build_snapshot(reqs, model_nodes, self.rtt, self.weights)
            choice, feasible = self._solve(snap)
            plans.append(ModelPlan(snap, choice, feasible))
            node_ids = [n.id for n in model_nodes]
            placed = np.flatnonzero(choice >= 0)
            decision.assignments.update(
                (reqs[i].id, node_ids[j]) for i, j in zip(placed.tolist(), choice[placed].tolist())
            )
            bad = np.flatnonzero(~feasible)
            if len(bad):
                for i, reason in zip(bad, explain(snap, bad)):
                    decision.rejections[reqs[i].id] = reason
            decision.deferred.extend(reqs[i].id for i in np.flatnonzero((choice < 0) & feasible))
        return decision, plans

    def _solve(self, snap: Snapshot) -> tuple[np.ndarray, np.ndarray]:
        """(node column per request, -1 = none; feasible ignoring capacity).

        Small batches (≤ `auction_cells`, every ordinary micro-batch): deferred acceptance,
        then the auction, keeping the better (the auction is near-exact but can stall).
        Mid-size: deferred acceptance on the whole batch. Huge: clearing prices from a
        row sample, then deferred acceptance in row chunks (the 10k × 1k path)."""
        R, N = len(snap.requests), len(snap.nodes)
        whole = R * N <= self.whole_matrix_cells
        feasible = np.empty(R, dtype=bool)
        lam = None if whole else self._clearing_prices(snap)
        S = score_matrix(snap, node_price=lam, feasible_out=feasible)
        choice, feasible = assign(
            S, snap.free, weight=snap.cost_ref, chunk=R if whole else self.chunk_rows,
            max_rounds=64 if whole else 8, feasible=feasible,
        )
        if R > 1 and R * N <= self.auction_cells:
            C = S.astype(np.float64) * snap.cost_ref[:, None]  # money, as the LP sees it
            alt = auction(C, snap.free)
            n_da, n_alt = int((choice >= 0).sum()), int((alt >= 0).sum())
            if n_alt > n_da or (n_alt == n_da and _total(C, alt) < _total(C, choice)):
                choice = _fill(S, alt, snap.free)  # the auction may stop short on a price war
        return choice, feasible

    def _clearing_prices(self, snap: Snapshot) -> np.ndarray | None:
        """For big batches, price contested nodes on a row sample first (see assignment)."""
        R, N = len(snap.requests), len(snap.nodes)
        if R < 4 * self.sample_rows:
            return None
        rng = np.random.default_rng(R * 7919 + N)
        rows = np.sort(rng.choice(R, self.sample_rows, replace=False))
        share = self.sample_rows / R
        cap = np.floor(snap.free * share + rng.random(N)).astype(np.int64)
        return clearing_prices(score_matrix(snap, rows=rows), cap, snap.cost_ref[rows])

    def route(self, requests: list[PendingRequest], nodes: list[NodeState]) -> Decision:
        return self.plan(requests, nodes)[0]
