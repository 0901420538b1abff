"""Per-request token selection over a batch of logits.

Greedy rows are one vectorised argmax. Sampled rows each use their own seeded
`torch.Generator`, so a request's draws do not depend on its batch mates. The reported
log-probability is always the log-softmax of the raw logits (before temperature/top-p).
"""

from __future__ import annotations

import os

import torch

from node_agent.engines.base import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.temperature <= 0:
        return None
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    return torch.Generator().manual_seed(seed)


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    x = logits / max(p.temperature, 1e-5)
    if p.top_k and 0 < p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, -1)
    if 0 < p.top_p < 1:
        sp, si = torch.sort(probs, descending=True)
        drop = (sp.cumsum(-1) - sp) > p.top_p
        sp = sp.masked_fill(drop, 0.0)
        return int(si[torch.multinomial(sp, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


def select(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]
) -> tuple[list[int], list[float]]:
    """Pick one token per row of float32 `logits` [B, vocab]; return (ids, log-probs)."""
    ids, lps, _ = select_with_top(logits, params, gens)
    return ids, lps


def select_with_top(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]
) -> tuple[list[int], list[float], list[list[tuple[int, float]] | None]]:
    """`select`, plus each row's `top_logprobs` likeliest (id, log-prob), best first (None
    for rows that asked for none): one top-k over the log-softmax the row already has."""
    logits = logits.float().cpu()
    logp = torch.log_softmax(logits, -1)
    ids = logits.argmax(-1).tolist()
    for i, (p, g) in enumerate(zip(params, gens)):
        if g is not None:
            ids[i] = _sample_row(logits[i], p, g)
    lps = logp.gather(1, torch.tensor(ids)[:, None])[:, 0].tolist()
    tops: list[list[tuple[int, float]] | None] = [None] * len(ids)
    for i, p in enumerate(params):
        k = min(getattr(p, "top_logprobs", 0) or 0, logp.shape[-1])
        if k > 0:
            values, idx = torch.topk(logp[i], k)
            tops[i] = list(zip(idx.tolist(), values.tolist()))
    return ids, lps, tops
