"""Detailed teacher-forced rescoring: what a verifier node computes for an audit.

One forward pass over prompt + claimed completion gives, for every claimed position:

- `logprob`: the claimed token's log-probability under this (reference) model, from the
  raw logits (the same convention as the engines: before temperature / top-k / top-p);
- `top1_id`, `top1_logprob`: the reference's most likely token there;
- `admissible`: whether the claimed token could have been produced under the request's
  sampling settings — greedy: within `margin` nats of the top-1 log-prob; sampled: inside
  the top-k set and the top-p nucleus of the tempered distribution, with `margin` nats of
  slack for the verifier's own rounding noise;
- `expected_logprob`, `var_logprob`: mean and variance of log p_ref(x) when x is drawn from
  the request's sampling distribution (temperature, top-k, top-p applied; a point mass on
  the argmax for greedy). An honest node's claimed tokens have a log-likelihood close to
  the sum of the expectations; a node that serves another model or invents tokens falls
  far below it, whatever log-probs it claims. `scheduler.verification` uses these.

`rescore_with_model` runs on a built-in `LlamaModel` directly (benchmarks, tests);
`rescore` runs it on a live engine's thread (`BuiltinEngine.call`) so it never races the
engine's own batches. Neither modifies the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_MARGIN = 0.5  # nats of slack for admissibility (verifier-side rounding noise)


@dataclass
class Rescore:
    """Per claimed position; every array has one entry per claimed token."""

    logprob: np.ndarray  # float64
    top1_id: np.ndarray  # int64
    top1_logprob: np.ndarray
    admissible: np.ndarray  # bool
    expected_logprob: np.ndarray
    var_logprob: np.ndarray
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.logprob)

    _ARRAYS = ("logprob", "top1_id", "top1_logprob", "admissible", "expected_logprob", "var_logprob")

    def to_dict(self) -> dict:
        """Plain lists (JSON) for the verifier's reply to the coordinator."""
        out = {k: getattr(self, k).tolist() for k in self._ARRAYS}
        out["meta"] = dict(self.meta)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Rescore":
        kinds = {"top1_id": np.int64, "admissible": bool}
        arrays = {k: np.asarray(d[k], dtype=kinds.get(k, np.float64)) for k in cls._ARRAYS}
        n = {len(a) for a in arrays.values()}
        if len(n) > 1:
            raise ValueError(f"rescore arrays of different lengths {sorted(n)}")
        return cls(**arrays, meta=dict(d.get("meta", {})))


def _sampling_fields(sampling) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) from a SamplingParams, a protocol Sampling or a dict."""
    get = sampling.get if isinstance(sampling, dict) else (lambda k, d: getattr(sampling, k, d))
    return float(get("temperature", 1.0)), int(get("top_k", 0) or 0), float(get("top_p", 1.0))


def rescore_logits(logits, claimed_ids, sampling, margin: float = DEFAULT_MARGIN) -> Rescore:
    """The per-position statistics from reference logits `[n, vocab]` (torch or numpy),
    row i being the distribution the claimed token i was drawn from."""
    import torch

    x = torch.as_tensor(logits).float()
    n = x.shape[0]
    ids = torch.as_tensor(np.asarray(claimed_ids, dtype=np.int64)).view(-1, 1)
    if ids.shape[0] != n:
        raise ValueError(f"{n} logit rows for {ids.shape[0]} claimed tokens")
    logp = torch.log_softmax(x, -1)
    lp = logp.gather(1, ids)[:, 0]
    top1_lp, top1 = logp.max(-1)
    temperature, top_k, top_p = _sampling_fields(sampling)
    vocab = x.shape[1]
    if temperature <= 0:
        admissible = lp >= top1_lp - margin
        expected, var = top1_lp, torch.zeros(n)
    else:
        # The engine's sampler: temperature, then top-k on the tempered logits, then top-p.
        t = logp / max(temperature, 1e-5)
        keep = torch.ones_like(t, dtype=torch.bool)
        admissible = torch.ones(n, dtype=torch.bool)
        if top_k and 0 < top_k < vocab:
            kth = torch.topk(t, top_k, -1).values[:, -1:]
            keep &= t >= kth
            admissible &= lp >= logp.gather(1, torch.topk(logp, top_k, -1).indices[:, -1:])[:, 0] - margin
        q = torch.softmax(t.masked_fill(~keep, float("-inf")), -1)
        if 0 < top_p < 1:
            # Inside the nucleus (with slack): the mass of tokens more likely than the claimed
            # one by more than `margin` nats is below top_p.
            mass_above = (q * (logp > lp[:, None] + margin).float()).sum(-1)
            admissible &= mass_above < top_p
            sq, si = torch.sort(q, -1, descending=True)
            drop_sorted = (sq.cumsum(-1) - sq) > top_p
            drop = torch.zeros_like(keep).scatter(1, si, drop_sorted)
            keep &= ~drop
            q = q.masked_fill(drop, 0.0)
            q = q / q.sum(-1, keepdim=True)
        safe = torch.where(q > 0, logp, torch.zeros_like(logp))
        expected = (q * safe).sum(-1)
        var = (q * (safe - expected[:, None]) ** 2).sum(-1).clamp_min(0.0)
    f64 = lambda v: v.detach().cpu().double().numpy()  # noqa: E731
    return Rescore(
        logprob=f64(lp), top1_id=top1.cpu().numpy().astype(np.int64), top1_logprob=f64(top1_lp),
        admissible=admissible.cpu().numpy().astype(bool), expected_logprob=f64(expected), var_logprob=f64(var),
        meta={"temperature": temperature, "top_k": top_k, "top_p": top_p, "margin": margin},
    )


def rescore_with_model(model, prompt_ids, claimed_ids, sampling, margin: float = DEFAULT_MARGIN) -> Rescore:
    """Rescore on a built-in `LlamaModel` (one `forward_full`, no KV cache touched)."""
    prompt_ids, claimed_ids = list(prompt_ids), list(claimed_ids)
    if not prompt_ids:
        raise ValueError("rescoring needs at least one prompt token")
    if not claimed_ids:
        return rescore_logits(np.zeros((0, model.cfg.vocab_size), np.float32), [], sampling, margin)
    vocab = model.cfg.vocab_size
    bad = [t for t in claimed_ids if not 0 <= t < vocab]
    if bad:  # an out-of-vocabulary claim is inadmissible at once
        raise ValueError(f"claimed token id {bad[0]} is outside the vocabulary of {vocab}")
    logits = model.forward_full(prompt_ids + claimed_ids)[len(prompt_ids) - 1 : -1]
    return rescore_logits(logits, claimed_ids, sampling, margin)


async def rescore(engine, prompt_ids, claimed_ids, sampling, margin: float = DEFAULT_MARGIN) -> Rescore:
    """Rescore on a started built-in engine, on its own thread between batches."""
    model = getattr(engine, "model", None)
    if model is None or not hasattr(model, "forward_full") or not hasattr(engine, "call"):
        raise TypeError(f"detailed rescoring needs the built-in engine, not {type(engine).__name__}")
    return await engine.call(lambda: rescore_with_model(model, prompt_ids, claimed_ids, sampling, margin))


def rescore_topk(claimed_ids, top: list[dict[int, float]], sampling, vocab_size: int,
                 margin: float = DEFAULT_MARGIN) -> Rescore:
    """The same statistics from engines that report only the top-K log-probs per position
    (vLLM's `prompt_logprobs=K`, an OpenAI-compatible server's `echo` + `logprobs=K`).

    `top[i]` maps token id -> log-prob at claimed position i and must contain the claimed
    token (engines return it besides the top K). The unseen rest of the vocabulary is one
    tail: its mass (1 - the seen mass) spread evenly over the unseen ids, each below every
    seen one. Greedy statistics are exact; sampled ones (expected log-likelihood, top-k/top-p
    admissibility) are exact up to that tail, which a K of 5-20 makes small on peaked models.
    """
    temperature, top_k, top_p = _sampling_fields(sampling)
    n = len(claimed_ids)
    out = {k: np.zeros(n) for k in ("logprob", "top1_logprob", "expected_logprob", "var_logprob")}
    top1_ids = np.zeros(n, np.int64)
    admissible = np.zeros(n, bool)
    for i, (cid, seen) in enumerate(zip(claimed_ids, top)):
        cid = int(cid)
        if cid not in seen:
            raise ValueError(f"position {i}: the engine did not report the claimed token {cid}")
        ids = np.fromiter(seen.keys(), np.int64, len(seen))
        lps = np.minimum(np.fromiter(seen.values(), np.float64, len(seen)), 0.0)
        lp = float(seen[cid])
        j = int(np.argmax(lps))
        out["logprob"][i], top1_ids[i], out["top1_logprob"][i] = lp, ids[j], lps[j]
        unseen = max(vocab_size - len(ids), 0)
        rest = max(0.0, 1.0 - float(np.exp(lps).sum()))
        tail_lp = np.log(rest / unseen) if unseen and rest > 0 else -np.inf
        if temperature <= 0:
            admissible[i] = lp >= lps[j] - margin
            out["expected_logprob"][i], out["var_logprob"][i] = lps[j], 0.0
            continue
        order = np.argsort(-lps)
        ids, lps = ids[order], lps[order]
        keep = np.ones(len(ids), bool)
        tail_kept = np.isfinite(tail_lp)
        ok = True
        if top_k and 0 < top_k < vocab_size:
            if top_k < len(ids):
                keep[top_k:] = False
                tail_kept = False
            ok &= lp >= lps[min(top_k, len(lps)) - 1] - margin or top_k >= len(lps)
        w = np.where(keep, np.exp(lps / max(temperature, 1e-5)), 0.0)
        w_tail = unseen * np.exp(tail_lp / max(temperature, 1e-5)) if tail_kept else 0.0
        total = w.sum() + w_tail
        q, q_tail = w / total, w_tail / total
        if 0 < top_p < 1:
            mass_above = float(q[lps > lp + margin].sum())
            ok &= mass_above < top_p
            drop = (np.cumsum(q) - q) > top_p
            q = np.where(drop, 0.0, q)
            if q.sum() >= top_p:
                q_tail = 0.0
            total = q.sum() + q_tail
            q, q_tail = q / total, q_tail / total
        admissible[i] = bool(ok)
        mean = float((q * lps).sum() + (q_tail * tail_lp if q_tail > 0 else 0.0))
        var = float((q * (lps - mean) ** 2).sum() + (q_tail * (tail_lp - mean) ** 2 if q_tail > 0 else 0.0))
        out["expected_logprob"][i], out["var_logprob"][i] = mean, max(var, 0.0)
    return Rescore(logprob=out["logprob"], top1_id=top1_ids, top1_logprob=out["top1_logprob"], admissible=admissible,
                   expected_logprob=out["expected_logprob"], var_logprob=out["var_logprob"],
                   meta={"temperature": temperature, "top_k": top_k, "top_p": top_p, "margin": margin,
                         "top_logprobs": max((len(t) for t in top), default=0)})
