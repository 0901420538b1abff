"""The request × node score matrix, in one vectorised pass.

For request r and node n (same model, node online):

    cost[r, n]    = prompt_r * price_in_n + max_tokens_r * price_out_n          (nano-$)
    ttft[r, n]    = RTT(region_r, region_n) + queue_n + TTFT_n[bucket_r]
                    + prompt_r / prefill_n                                      (ms)
    decode[r, n]  = max_tokens_r / tok_s_n[bucket_r]                           (ms)
    latency       = ttft + decode

Every term is *linear* in a few per-request features (prompt, max_tokens, a one-hot of
the buyer's region and of the prompt-length bucket) times per-node coefficients, so each
matrix is a single small-K matrix product (BLAS), and the preference weighting (per row)
and the reputation / load / honesty multipliers (per column) fold into the two factors:

    score = (a_r * cost/cost_ref_r + b_r * latency-ish/lat_ref_r) * mult_n

with (a, b) from the request's `sort`: price → cost (latency breaks ties), throughput →
decode time, latency → time to first token, default (balanced) → cost plus
`balanced_latency` × latency, each normalised by the request's own reference (its target
if it has one) so rows are comparable. Hard constraints (max_price, max_ttft_ms after the
time already queued, min_tokens_per_s, a required region) set infeasible cells to +inf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from scheduler.estimates import N_BUCKETS, prompt_buckets
from scheduler.latency import RttTable, default_rtt_table
from scheduler.routing import AFFINITY_CAP, NodeState, PendingRequest, prefill_ms_per_token

SORTS = {None: 0, "price": 1, "throughput": 2, "latency": 3}
INF = np.float32(np.inf)


@dataclass(frozen=True)
class ScoreWeights:
    balanced_latency: float = 0.15  # latency weight in the balanced (default) score
    tie: float = 0.001  # weight of the secondary term under an explicit sort (tie-break)
    reputation_power: float = 1.0  # score /= reputation ** power
    load_penalty: float = 0.3  # score *= 1 + load_penalty * load
    overclaim_power: float = 2.0  # score /= (measured / advertised) ** power when < 1
    # Cache affinity: a (request, node) pair's score is lowered by the prefill time the node
    # saves on the prompt prefix it holds (PendingRequest.cached_tokens), each saved ms weighed
    # as a sort=latency request weighs TTFT (1 / its TTFT reference) times this, or as the
    # request's own TTFT weight if that is larger; never by more than `affinity_max_discount`
    # of the pair's score. 0: off. Calibrated in bench/routing.py (affinity_ttft_gain).
    affinity: float = 2.0  # bench/routing.py calibration (seed 0 and 0-1; reported on others)
    affinity_max_discount: float = 0.5


@dataclass
class Snapshot:
    """Arrays for one model's requests and nodes (rows: requests, columns: nodes)."""

    requests: list[PendingRequest]
    nodes: list[NodeState]
    prompt: np.ndarray
    max_tokens: np.ndarray
    bucket: np.ndarray
    x_ttft: np.ndarray  # R × Kt
    y_ttft: np.ndarray  # N × Kt
    x_dec: np.ndarray  # R × B
    y_dec: np.ndarray  # N × B
    price_in: np.ndarray
    price_out: np.ndarray
    tps_nb: np.ndarray  # N × B measured tok/s
    ttft_budget: np.ndarray  # R, +inf where none
    min_tps: np.ndarray  # R, 0 where none
    max_price: np.ndarray  # R, +inf where none
    region_ok_rows: np.ndarray  # rows with require_region
    req_region_code: np.ndarray
    node_region_code: np.ndarray
    cost_ref: np.ndarray  # R, nano-$ (a typical node's cost for this request)
    x_score: np.ndarray
    y_score: np.ndarray
    free: np.ndarray  # N, int
    # Fast path: a request's TTFT and every node-threshold constraint depend only on its
    # *class* (region, bucket,
    # min_tokens_per_s, max_price, require_region): one lookup row per class, +inf
    # where the class's thresholds exclude the node. None: use the general path.
    constraint_class: np.ndarray | None  # R
    constraint_table: np.ndarray | None  # classes × N, float32 ms
    # Cache affinity, sparse: score cells (aff_rows[i], aff_cols[i]) are lowered by
    # aff_bonus[i] (the saved prefill time in the row's score units, node multiplier included).
    # Hard constraints (max_ttft_ms) are judged without the saving: an estimate never makes
    # a node that would miss the target look as if it met it.
    aff_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    aff_cols: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    aff_bonus: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    aff_max_discount: float = 0.5
    aff_saved_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))


def _node_multiplier(nodes: list[NodeState], w: ScoreWeights) -> np.ndarray:
    rep = np.array([max(n.reputation, 1e-3) for n in nodes], dtype=np.float64)
    load = np.array([min(max(n.load, 0.0), 1.0) for n in nodes], dtype=np.float64)
    honesty = np.array([_claim_ratio(n) for n in nodes], dtype=np.float64)
    return rep ** -w.reputation_power * (1.0 + w.load_penalty * load) * np.minimum(honesty, 1.0) ** -w.overclaim_power


def _claim_ratio(n: NodeState) -> float:
    ratio = getattr(n, "claim_ratio", None)
    if ratio is not None:
        return max(float(ratio), 1e-3)
    if n.advertised_tokens_per_s:
        return max(n.tokens_per_s / n.advertised_tokens_per_s, 1e-3)
    return 1.0


def _per_bucket(values: tuple[float, ...] | None, scalar: float) -> tuple[float, ...]:
    return tuple(values) if values is not None and len(values) == N_BUCKETS else (scalar,) * N_BUCKETS


def build_snapshot(
    requests: list[PendingRequest],
    nodes: list[NodeState],
    rtt: RttTable | None = None,
    weights: ScoreWeights = ScoreWeights(),
) -> Snapshot:
    """Arrays for requests × nodes. Callers pass one model's requests and online nodes."""
    rtt = rtt or default_rtt_table()
    R, N, B = len(requests), len(nodes), N_BUCKETS
    f64 = np.float64
    inf = np.inf
    # One pass over the requests (the dominant Python cost at 10k requests).
    cols = np.array(
        [
            (
                r.prompt_tokens, r.max_tokens, inf if r.max_ttft_ms is None else r.max_ttft_ms, r.waited_ms,
                r.min_tokens_per_s or 0.0, inf if r.max_price is None else r.max_price, SORTS.get(r.sort, 0),
                r.require_region,
            )
            for r in requests
        ],
        dtype=f64,
    ).reshape(R, 8)
    prompt, max_tokens, max_ttft, waited, min_tps, max_price = (cols[:, k].copy() for k in range(6))
    sort = cols[:, 6].astype(np.int64)
    require = cols[:, 7] > 0
    bucket = prompt_buckets(prompt)
    req_regions = [r.region for r in requests]
    uniq = sorted({g for g in req_regions if g is not None})
    code = {g: i for i, g in enumerate(uniq)}
    code[None] = len(uniq)
    rcode = np.array([code[g] for g in req_regions], dtype=np.int64).reshape(R)
    node_regions = [n.region for n in nodes]
    rtt_rows = np.empty((len(uniq) + 1, N))
    if uniq:
        rtt_rows[: len(uniq)] = rtt.matrix(uniq, node_regions)
    rtt_rows[len(uniq)] = [n.rtt_ms for n in nodes]

    tps_nb = np.array([_per_bucket(n.tokens_per_s_by_bucket, n.tokens_per_s) for n in nodes], f64).reshape(N, B)
    tps_nb = np.maximum(tps_nb, 1e-6)
    ttft_nb = np.array([_per_bucket(n.ttft_ms_by_bucket, n.ttft_ms) for n in nodes], f64).reshape(N, B)
    price_in = np.fromiter((n.price_in for n in nodes), f64, N)
    price_out = np.fromiter((n.price_out for n in nodes), f64, N)

    g1 = len(uniq) + 1
    x_ttft = np.zeros((R, g1 + B), f64)
    x_ttft[np.arange(R), rcode] = 1.0
    x_ttft[np.arange(R), g1 + bucket] = 1.0
    y_ttft = np.concatenate([rtt_rows.T, ttft_nb], axis=1)  # the measured TTFT per bucket includes prefill
    x_dec = np.zeros((R, B), f64)
    x_dec[np.arange(R), bucket] = max_tokens
    y_dec = 1000.0 / tps_nb


    # Per-request references: what a typical node would charge / take for this request.
    med_in, med_out = (float(np.median(price_in)), float(np.median(price_out))) if N else (1.0, 1.0)
    med_tps = float(np.median(tps_nb[:, 1])) if N else 1.0
    med_ttft = float(np.median(ttft_nb[:, 1] + rtt_rows[-1])) if N else 100.0
    cost_ref = np.maximum((prompt * med_in + max_tokens * med_out) / 1e6, 1e-9)
    ttft_ref = np.where(np.isfinite(max_ttft), max_ttft, med_ttft)
    dec_ref = max_tokens * 1000.0 / np.where(min_tps > 0, min_tps, med_tps)
    lat_ref = ttft_ref + dec_ref

    w = weights
    a = np.where(sort <= 1, 1.0, w.tie) / cost_ref  # cost weight
    lat_w = np.select([sort == 0, sort == 1], [w.balanced_latency, w.tie], 0.0) / lat_ref
    t_w = lat_w + np.where(sort == 3, 1.0 / np.maximum(ttft_ref, 1.0), 0.0)  # on ttft features
    d_w = lat_w + np.where(sort == 2, 1.0 / np.maximum(dec_ref, 1.0), 0.0)  # on decode features
    x_score = np.concatenate([(a * prompt / 1e6)[:, None], (a * max_tokens / 1e6)[:, None], t_w[:, None] * x_ttft, d_w[:, None] * x_dec], axis=1)
    mult = _node_multiplier(nodes, w) if N else np.zeros(0)
    y_score = mult[:, None] * np.concatenate([price_in[:, None], price_out[:, None], y_ttft, y_dec], axis=1)

    aff_w = np.maximum(t_w, w.affinity / np.maximum(ttft_ref, 1.0))  # per row, on saved ms
    aff = _affinity(requests, nodes, prompt, bucket, ttft_nb, aff_w, mult, w.affinity)
    node_code = np.array([-1 if g is None else code.get(g, -1) for g in node_regions], np.int64).reshape(N)
    classes, table = _constraint_classes(
        rcode, bucket, min_tps, max_price, require, rtt_rows, ttft_nb, tps_nb, price_out, node_code,
    )
    return Snapshot(
        requests=requests, nodes=nodes, prompt=prompt, max_tokens=max_tokens, bucket=bucket,
        x_ttft=x_ttft.astype(np.float32), y_ttft=y_ttft.astype(np.float32),
        x_dec=x_dec.astype(np.float32), y_dec=y_dec.astype(np.float32),
        price_in=price_in, price_out=price_out, tps_nb=tps_nb,
        ttft_budget=max_ttft - waited, min_tps=min_tps, max_price=max_price,
        region_ok_rows=np.flatnonzero(require).astype(np.int64),
        req_region_code=rcode, node_region_code=node_code, cost_ref=cost_ref,
        x_score=x_score.astype(np.float32), y_score=y_score.astype(np.float32),
        free=np.fromiter((max(n.free_slots, 0) for n in nodes), np.int64, N),
        constraint_class=classes,
        constraint_table=table,
        aff_max_discount=w.affinity_max_discount,
        **aff,
    )


def _affinity(requests, nodes, prompt, bucket, ttft_nb, aff_w, mult, weight) -> dict:
    """The sparse cache-affinity cells (see `Snapshot.aff_rows`): for each request's
    (node, cached tokens) pair, the prefill time saved = cached tokens × the node's prefill
    ms per token, at most `AFFINITY_CAP` of its expected TTFT for the prompt."""
    if weight <= 0:
        return {}
    cells: dict[tuple[int, int], int] = {}
    col = None
    for i, r in enumerate(requests):
        if not r.cached_tokens:
            continue
        if col is None:
            col = {n.id: j for j, n in enumerate(nodes)}
        for nid, t in r.cached_tokens:
            j = col.get(nid)
            if j is not None and t > cells.get((i, j), 0):
                cells[(i, j)] = t
    if not cells:
        return {}
    rows_a = np.fromiter((k[0] for k in cells), np.int64, len(cells))
    cols_a = np.fromiter((k[1] for k in cells), np.int64, len(cells))
    held = list(cells.values())
    cols = cols_a.tolist()
    mspt = np.array([prefill_ms_per_token(nodes[j]) for j in cols], np.float64)
    saved = np.minimum(np.minimum(np.array(held, np.float64), prompt[rows_a]) * mspt,
                       AFFINITY_CAP * np.maximum(ttft_nb[cols_a, bucket[rows_a]], 0.0))
    bonus = aff_w[rows_a] * mult[cols_a] * saved
    return {"aff_rows": rows_a, "aff_cols": cols_a, "aff_bonus": bonus.astype(np.float32), "aff_saved_ms": saved}


def constraint_masks(snap: Snapshot, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per hard constraint, a (len(rows) × N) boolean matrix of *violations*."""
    out: dict[str, np.ndarray] = {}
    N = len(snap.nodes)
    out["max_price"] = snap.price_out[None, :] > snap.max_price[rows, None]
    req = np.isin(rows, snap.region_ok_rows)
    out["region"] = req[:, None] & (snap.node_region_code[None, :] != snap.req_region_code[rows, None])
    tps = snap.tps_nb[:, snap.bucket[rows]].T if N else np.zeros((len(rows), 0))
    out["min_tokens_per_s"] = tps < snap.min_tps[rows, None]
    ttft = snap.x_ttft[rows] @ snap.y_ttft.T
    out["max_ttft_ms"] = ttft > snap.ttft_budget[rows, None]
    return out


MAX_CLASSES = 1024


def _constraint_classes(rcode, bucket, min_tps, max_price, require, rtt_rows, ttft_nb, tps_nb, price_out, node_code):
    """(class per request, classes × nodes TTFT table with +inf where excluded) or (None, None)."""
    if len(rcode) == 0:
        return None, None
    _, tps_i = np.unique(min_tps, return_inverse=True)
    _, price_i = np.unique(max_price, return_inverse=True)
    key = ((((rcode * N_BUCKETS + bucket) * 2 + require) * (tps_i.max() + 1) + tps_i) * (price_i.max() + 1) + price_i)
    uniq, first, classes = np.unique(key, return_index=True, return_inverse=True)
    if len(uniq) > MAX_CLASSES:
        return None, None
    g, b = rcode[first], bucket[first]
    table = rtt_rows[g] + ttft_nb[:, b].T  # classes × N
    table[tps_nb[:, b].T < min_tps[first, None]] = np.inf
    table[price_out[None, :] > max_price[first, None]] = np.inf
    table[require[first, None] & (node_code[None, :] != g[:, None])] = np.inf
    return classes.reshape(-1), table.astype(np.float32)


def score_matrix(
    snap: Snapshot,
    rows: np.ndarray | None = None,
    node_price: np.ndarray | None = None,
    chunk: int = 512,
    feasible_out: np.ndarray | None = None,
) -> np.ndarray:
    """float32 scores for `rows` (default: all) × nodes, +inf where a hard constraint fails.

    `node_price` (nano-$ per request, per node) is an extra per-node charge, added in the
    row's normalised units (the assignment's clearing prices). Work is done in row chunks
    that stay in cache: one matrix product for the score, one for the TTFT, one mask.
    `feasible_out` (bool, one per row), when given, receives whether any node is feasible.
    """
    rows = np.arange(len(snap.requests)) if rows is None else np.asarray(rows)
    xs, ys = snap.x_score[rows], snap.y_score
    if node_price is not None:
        xs = np.concatenate([xs, (1.0 / snap.cost_ref[rows]).astype(np.float32)[:, None]], axis=1)
        ys = np.concatenate([ys, node_price.astype(np.float32)[:, None]], axis=1)
    ysT, ytT = np.ascontiguousarray(ys.T), np.ascontiguousarray(snap.y_ttft.T)
    xt = snap.x_ttft[rows]
    budget = snap.ttft_budget[rows].astype(np.float32)
    has_ttft = np.isfinite(budget)
    min_tps, bucket = snap.min_tps[rows].astype(np.float32), snap.bucket[rows]
    tps32 = np.ascontiguousarray(snap.tps_nb.T, dtype=np.float32)  # B × N
    max_price = snap.max_price[rows]
    region_rows = np.isin(rows, snap.region_ok_rows) if len(snap.region_ok_rows) else None
    S = np.empty((len(rows), len(snap.nodes)), dtype=np.float32)
    fast = snap.constraint_table is not None
    if fast:
        cls = snap.constraint_class[rows]
        limit = np.where(has_ttft, budget, np.float32(3e38))  # +inf in the table still fails
        tbuf = np.empty((min(chunk, len(rows)), len(snap.nodes)), dtype=np.float32)
    for lo in range(0, len(rows), chunk):
        hi = min(lo + chunk, len(rows))
        out = S[lo:hi]
        np.matmul(xs[lo:hi], ysT, out=out)
        sl = slice(lo, hi)
        if fast:  # one lookup and one comparison cover every hard constraint
            t = tbuf[: hi - lo]
            np.take(snap.constraint_table, cls[sl], axis=0, out=t)
            mask = t > limit[sl, None]
        else:
            mask = _general_mask(snap, rows[sl], xt[sl], ytT, budget[sl], has_ttft[sl], min_tps[sl], bucket[sl],
                                 tps32, max_price[sl], region_rows[sl] if region_rows is not None else None)
        np.putmask(out, mask, INF)
        if feasible_out is not None:
            feasible_out[lo:hi] = ~mask.all(axis=1)
    if len(snap.aff_rows):
        pos = np.full(len(snap.requests), -1, np.int64)
        pos[rows] = np.arange(len(rows))
        p = pos[snap.aff_rows]
        on = p >= 0
        if on.any():  # (row, node) cells are unique; +inf (infeasible) cells stay +inf
            r, c = p[on], snap.aff_cols[on]
            cell = S[r, c]
            S[r, c] = np.maximum(cell - snap.aff_bonus[on], cell * np.float32(1.0 - snap.aff_max_discount))
    return S


def _general_mask(snap, rows, xt, ytT, budget, has_ttft, min_tps, bucket, tps32, max_price, region_rows):
    """Violations for one chunk when there are too many constraint classes for a table."""
    if has_ttft.any():
        mask = (xt @ ytT) > budget[:, None]
    else:
        mask = np.zeros((len(rows), tps32.shape[1]), dtype=bool)
    need = min_tps > 0
    for b in range(N_BUCKETS) if need.any() else ():  # broadcast per bucket, no gather
        sub = np.flatnonzero(need & (bucket == b))
        if len(sub):
            mask[sub] |= tps32[b][None, :] < min_tps[sub, None]
    sub = np.flatnonzero(np.isfinite(max_price))
    if len(sub):
        mask[sub] |= snap.price_out[None, :] > max_price[sub, None]
    if region_rows is not None:
        sub = np.flatnonzero(region_rows)
        if len(sub):
            mask[sub] |= snap.node_region_code[None, :] != snap.req_region_code[rows[sub], None]
    return mask


def expected_cost(snap: Snapshot, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Expected (worst-case) cost in nano-$ of serving rows[i] on cols[i]."""
    return (snap.prompt[rows] * snap.price_in[cols] + snap.max_tokens[rows] * snap.price_out[cols]) / 1e6


def expected_latency(snap: Snapshot, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(time to first token, total latency) in ms for rows[i] on cols[i]."""
    ttft = np.einsum("ij,ij->i", snap.x_ttft[rows].astype(np.float64), snap.y_ttft[cols].astype(np.float64))
    dec = snap.max_tokens[rows] * 1000.0 / snap.tps_nb[cols, snap.bucket[rows]]
    return ttft, ttft + dec
