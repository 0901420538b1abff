"""The offline optimum of one dispatch snapshot, as a linear program (scipy HiGHS).

Variables x[r, n] ∈ [0, 1] for every feasible (request, node) pair;
`Σ_n x[r, n] ≤ 1` per request, `Σ_r x[r, n] ≤ free_n` per node. The objective first
maximises the number of requests placed (a reward larger than any score), then minimises
the total objective: the policy's own score (`objective="score"`) or the money cost
(`objective="cost"`). The constraint matrix is a bipartite incidence matrix (totally
unimodular), so the LP optimum is integral: it *is* the best assignment.

Offline only (bench and tests): it takes 0.1–10 s where the policy has milliseconds.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.optimize import linprog

from scheduler.scoring import Snapshot, score_matrix


def solve_assignment(S: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Node column per row (-1: unplaced) minimising Σ S under capacity; +inf = infeasible."""
    R, N = S.shape
    rows, cols = np.nonzero(np.isfinite(S))
    choice = np.full(R, -1, dtype=np.int64)
    if len(rows) == 0:
        return choice
    vals = S[rows, cols].astype(np.float64)
    reward = 10.0 * (np.abs(vals).max() + 1.0) * max(R, 1)
    c = vals - reward
    k = len(rows)
    a_rows = sparse.csr_matrix((np.ones(k), (rows, np.arange(k))), shape=(R, k))
    a_cols = sparse.csr_matrix((np.ones(k), (cols, np.arange(k))), shape=(N, k))
    A = sparse.vstack([a_rows, a_cols]).tocsr()
    b = np.concatenate([np.ones(R), np.maximum(np.asarray(capacity, dtype=np.float64), 0.0)])
    res = linprog(c, A_ub=A, b_ub=b, bounds=(0.0, 1.0), method="highs")
    if res.status != 0:
        raise RuntimeError(f"LP failed: {res.message}")
    x = res.x
    on = x > 0.5
    choice[rows[on]] = cols[on]
    return choice


def optimum(snap: Snapshot, objective: str = "score") -> np.ndarray:
    """The optimal assignment of a policy snapshot (see module docstring)."""
    S = score_matrix(snap).astype(np.float64)
    if objective == "cost":
        cost = (snap.prompt[:, None] * snap.price_in[None, :] + snap.max_tokens[:, None] * snap.price_out[None, :]) / 1e6
        S = np.where(np.isfinite(S), cost, np.inf)
    elif objective != "score":
        raise ValueError(f"objective must be 'score' or 'cost', not {objective!r}")
    else:
        S = S * snap.cost_ref[:, None]  # in money, as the assignment's regrets
    return solve_assignment(S, snap.free)
