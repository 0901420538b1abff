"""Rescoring from top-K log-probs (vLLM prompt_logprobs, OpenAI echo) agrees with the full
rescoring: exactly for greedy, closely for sampled settings on a peaked model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from node_agent.rescoring import rescore_logits, rescore_topk


def _peaked(n=24, vocab=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 3.0
    logp = torch.log_softmax(logits, -1)
    claimed = torch.multinomial(logp.exp(), 1, generator=g)[:, 0].tolist()
    return logits, logp, claimed


def _top(logp, claimed, k):
    out = []
    for row, c in zip(logp, claimed):
        vals, idx = torch.topk(row, k)
        d = {int(i): float(v) for i, v in zip(idx, vals)}
        d[int(c)] = float(row[c])
        out.append(d)
    return out


def test_greedy_statistics_are_exact():
    logits, logp, claimed = _peaked()
    s = {"temperature": 0.0}
    full, approx = rescore_logits(logits, claimed, s), rescore_topk(claimed, _top(logp, claimed, 5), s, 300)
    for k in ("logprob", "top1_id", "top1_logprob", "admissible", "expected_logprob"):
        assert np.allclose(getattr(full, k), getattr(approx, k), atol=1e-5), k


@pytest.mark.parametrize("sampling", [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9},
                                      {"temperature": 1.0, "top_k": 5}])
def test_sampled_statistics_are_close_with_twenty_candidates(sampling):
    logits, logp, claimed = _peaked()
    full, approx = rescore_logits(logits, claimed, sampling), rescore_topk(claimed, _top(logp, claimed, 20), sampling, 300)
    assert np.allclose(full.logprob, approx.logprob, atol=1e-5)
    assert np.abs(full.expected_logprob - approx.expected_logprob).mean() < 0.15
    assert (full.admissible == approx.admissible).mean() >= 0.9


def test_the_claimed_token_must_be_reported():
    with pytest.raises(ValueError):
        rescore_topk([7], [{1: -0.1, 2: -3.0}], {"temperature": 0.0}, 100)
