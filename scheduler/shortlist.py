"""Which offers of a large fleet are worth scoring for one request.

The price-performance score of a node for a request is its multiplier (reputation, load,
honesty about its speed: `scoring._node_multiplier`) times a positive mix of what the
request would cost there, its time to first token there and its decode time there. The
best node is therefore almost always among the best few by one of those terms, or by
the balanced mix the default score is; the shortlist is the union of the k best by each, with the same
multiplier. A fleet no larger than the shortlist would be is returned whole, so small
markets route exactly as before; `tests/coordinator/test_market_view.py` checks the
choice against scoring every node on random fleets.
"""

from __future__ import annotations

import numpy as np

from scheduler.routing import NodeState, PendingRequest, eligible
from scheduler.estimates import prompt_buckets
from scheduler.latency import default_rtt_table
from scheduler.scoring import ScoreWeights, _node_multiplier, _per_bucket

SHORTLIST = 128  # per criterion


def shortlist(states: list[NodeState], req: PendingRequest, k: int = SHORTLIST,
              weights: ScoreWeights = ScoreWeights()) -> list[NodeState]:
    free = [n for n in states if n.free_slots > 0 and eligible(req, n)]  # never cut the ones it may use
    if len(free) <= 5 * k:
        return free
    mult = _node_multiplier(free, weights)
    b = int(prompt_buckets(np.array([req.prompt_tokens], float))[0])  # as the score sees the prompt
    rtt = default_rtt_table().matrix([req.region], [n.region for n in free])[0] if req.region is not None \
        else np.array([n.rtt_ms for n in free], float)
    cost = np.array([req.prompt_tokens * n.price_in + req.max_tokens * n.price_out for n in free], float) * mult
    ttft = (rtt + np.array([_per_bucket(n.ttft_ms_by_bucket, n.ttft_ms)[b] for n in free], float)) * mult
    dec = np.array([req.max_tokens * 1000.0 / max(_per_bucket(n.tokens_per_s_by_bucket, n.tokens_per_s)[b], 1e-6)
                    for n in free], float) * mult
    # the balanced score itself, with the reference figures `scoring.build_snapshot` uses
    # (medians over every offer passed in, busy ones included)
    med_in = float(np.median([n.price_in for n in states]))
    med_out = float(np.median([n.price_out for n in states]))
    med_tps = float(np.median([_per_bucket(n.tokens_per_s_by_bucket, n.tokens_per_s)[1] for n in states]))
    med_ttft = float(np.median([_per_bucket(n.ttft_ms_by_bucket, n.ttft_ms)[1] + n.rtt_ms for n in states]))
    cost_ref = max(req.prompt_tokens * med_in + req.max_tokens * med_out, 1e-3)
    ttft_ref = req.max_ttft_ms if req.max_ttft_ms is not None else med_ttft
    dec_ref = req.max_tokens * 1000.0 / (req.min_tokens_per_s or max(med_tps, 1e-6))
    mixed = cost / cost_ref + weights.balanced_latency * (ttft + dec) / max(ttft_ref + dec_ref, 1e-9)
    keep: set[int] = set()
    for key in (cost, ttft, dec, ttft + dec, mixed):
        keep.update(np.argpartition(key, k)[:k].tolist())
    if req.region is not None:
        keep.update(i for i, n in enumerate(free) if n.region == req.region)
    if req.cached_tokens:  # nodes that hold its prefix (cache affinity) are always scored
        holders = {nid for nid, _ in req.cached_tokens}
        keep.update(i for i, n in enumerate(free) if n.id in holders)
    return [free[i] for i in sorted(keep)]

