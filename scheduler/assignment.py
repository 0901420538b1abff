"""Assign requests to nodes under capacity: vectorised deferred acceptance with regret priority.

Why this solver. The exact problem (min total score, each request to at most one node,
each node at most `free` requests) is a transportation problem; an LP/min-cost-flow solves
it exactly (`scheduler.sim.optimum` does, for the benchmark) but takes 100 ms – seconds at
10,000 × 1,000, far over a dispatch budget of a few ms per micro-batch. The Hungarian
algorithm is O(n³). A pure sequential greedy needs one argmin per request (10,000 Python
iterations). Instead we run an auction-style deferred acceptance, all in numpy:

1. every open request proposes to its best remaining node (one argmin over its row);
2. a node holding more proposals than free slots keeps those with the largest *regret*
   (second-best score minus best, in money: the normalised score times the request's
   cost reference), i.e. the requests that lose most by going elsewhere — Vogel's rule,
   which is what an auction's bid increments converge to; holds are tentative, so a
   later, higher-regret proposal bumps a held one (Gale–Shapley);
3. bumped requests cross that node off and propose again.

Each round is one vectorised pass over the still-open rows. When every request wants the
same few nodes (prices are correlated), a round only fills those nodes, so large batches are
cut into row chunks (in priority order: oldest first) that each settle in 1–3 rounds while
staying in cache; for very large batches the policy first estimates per-node clearing
prices on a row sample (`clearing_prices`), which spreads demand before the full pass.
Batches up to ~300k cells run as one chunk (better: regret sees the whole batch). After
`max_rounds` the few stragglers finish with a plain sequential greedy. Measured quality
against the LP optimum is in bench/routing.py.
"""

from __future__ import annotations

import numpy as np

INF = np.float32(np.inf)



def assign(
    S: np.ndarray,
    capacity: np.ndarray,
    weight: np.ndarray | None = None,
    order: np.ndarray | None = None,
    chunk: int = 128,
    max_rounds: int = 16,
    feasible: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(node index per row, -1 for none; whether the row had any feasible node at all,
    ignoring capacity). `S` (float32, +inf = infeasible) is read only. `weight` converts
    a row's score to money for the regret priority (default 1); `order` is the row
    priority across chunks (default: as given, e.g. oldest first); `feasible`, if the
    caller already knows it (from `score_matrix(feasible_out=...)`), saves a pass."""
    R, N = S.shape
    choice = np.full(R, -1, dtype=np.int64)
    known = feasible is not None
    feasible = np.asarray(feasible, dtype=bool) if known else np.zeros(R, dtype=bool)
    if R == 0 or N == 0:
        return choice, feasible
    cap = np.asarray(capacity, dtype=np.int64).copy()
    w = np.ones(R) if weight is None else np.asarray(weight, dtype=np.float64)
    order = np.arange(R) if order is None else np.asarray(order)
    for lo in range(0, R, chunk):
        rows = order[lo : lo + chunk]
        sub = S[rows]
        if not known:
            feasible[rows] = np.isfinite(sub.min(axis=1))
        closed = cap <= 0
        if closed.any():
            sub[:, closed] = INF
        _rounds(sub, rows, cap, w[rows], choice, max_rounds)
    return choice, feasible


def _rounds(sub: np.ndarray, rows: np.ndarray, cap: np.ndarray, w: np.ndarray, choice: np.ndarray, max_rounds: int) -> None:
    """Deferred acceptance with regret priority on one chunk; updates `cap` and `choice`.

    Acceptances are tentative (Gale–Shapley): a node holds its best proposals by regret
    and bumps a held request when a higher-regret one arrives; a bumped request never
    proposes to that node again."""
    n, N = sub.shape
    tent = np.full(n, -1, dtype=np.int64)
    prio = np.zeros(n)
    idx = np.arange(n)  # rows proposing this round
    for k in range(max_rounds):
        # First round: work on `sub` itself (no copy). Crossing a row's proposal off in
        # `sub` is harmless: it is either kept there or bumped (and crossed off anyway).
        part = sub if k == 0 else sub[idx]
        best = part.argmin(axis=1)
        best_val = part[np.arange(len(idx)), best]
        alive = np.isfinite(best_val)
        if not alive.all():
            idx, best, best_val, part = idx[alive], best[alive], best_val[alive], part[alive]
        if len(idx) == 0:
            break
        part[np.arange(len(idx)), best] = INF
        second = part.min(axis=1)
        prio[idx] = np.where(np.isfinite(second), second - best_val, 1e30) * w[idx]
        tent[idx] = best
        held = np.flatnonzero(tent >= 0)
        t = tent[held]
        if (np.bincount(t, minlength=N) <= cap).all():
            idx = idx[:0]
            break
        order = np.lexsort((-prio[held], t))
        st = t[order]
        starts = np.searchsorted(st, np.arange(N))
        rank = np.arange(len(order)) - starts[st]
        idx = held[order[rank >= cap[st]]]
        sub[idx, tent[idx]] = INF
        tent[idx] = -1
    ok = np.flatnonzero(tent >= 0)
    choice[rows[ok]] = tent[ok]
    np.subtract.at(cap, tent[ok], 1)
    for i in idx:  # stragglers after max_rounds: sequential greedy on what is left
        row = sub[i]
        row[cap <= 0] = INF
        j = int(row.argmin())
        if np.isfinite(row[j]):
            choice[rows[i]] = j
            cap[j] -= 1


def clearing_prices(S: np.ndarray, capacity: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Per-node charge (money) that spreads demand to capacity, estimated on a row sample.

    Solve the sample (capacities scaled to it) with `assign`; a node the sample fills gets
    the smallest regret among the rows it kept: the price at which its marginal winner is
    indifferent. Adding it to every row's score (in the row's money units) before the full
    pass sends rows that gain less than that elsewhere, so the full problem starts with
    demand already close to capacity and deferred acceptance needs only a few rounds.
    """
    R, N = S.shape
    S0 = S
    choice, _ = assign(S, capacity, weight)
    got = np.bincount(choice[choice >= 0], minlength=N)
    filled = (got >= capacity) & (capacity > 0)
    rows = np.flatnonzero(choice >= 0)
    rows = rows[filled[choice[rows]]]
    lam = np.zeros(N)
    if len(rows) == 0:
        return lam
    cols = choice[rows]
    best = S0[rows, cols].astype(np.float64)
    tmp = S0[rows]
    tmp[np.arange(len(rows)), cols] = INF
    second = tmp.min(axis=1).astype(np.float64)
    regret = np.where(np.isfinite(second), second - best, 0.0) * weight[rows]
    lam_full = np.full(N, np.inf)
    np.minimum.at(lam_full, cols, regret)
    lam[filled] = lam_full[filled]
    lam[~np.isfinite(lam)] = 0.0
    return lam
