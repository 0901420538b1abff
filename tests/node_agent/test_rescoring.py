"""Teacher-forced rescoring: per-position log-probs, top-1, admissibility, expectations."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import torch

from node_agent.engines.base import SamplingParams
from node_agent.engines.builtin import load_builtin_engine
from node_agent.rescoring import rescore, rescore_logits, rescore_with_model


def _logits(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float32))


def test_greedy_admits_the_argmax_within_the_margin_only():
    x = _logits([[0.5, 0.3, 0.2], [0.5, 0.45, 0.05]])
    r = rescore_logits(x, [1, 1], {"temperature": 0.0}, margin=0.2)
    assert list(r.top1_id) == [0, 0]
    assert r.logprob == pytest.approx([math.log(0.3), math.log(0.45)], abs=1e-6)
    assert list(r.admissible) == [False, True]  # gap log(0.5/0.3)=0.51 > 0.2; log(0.5/0.45)=0.105 ok
    assert r.expected_logprob == pytest.approx([math.log(0.5)] * 2, abs=1e-6)
    assert list(r.var_logprob) == [0.0, 0.0]


def test_top_k_and_top_p_admissibility():
    x = _logits([[0.4, 0.3, 0.2, 0.1]] * 4)
    r = rescore_logits(x, [0, 1, 2, 3], SamplingParams(temperature=1.0, top_k=2), margin=0.0)
    assert list(r.admissible) == [True, True, False, False]
    r = rescore_logits(x, [0, 1, 2, 3], SamplingParams(temperature=1.0, top_p=0.65), margin=0.0)
    assert list(r.admissible) == [True, True, False, False]  # nucleus {0, 1}: 0.7 >= 0.65
    r = rescore_logits(x, [0, 1, 2, 3], SamplingParams(temperature=1.0), margin=0.0)
    assert r.admissible.all()
    # The expectation is over the truncated, renormalised sampling distribution.
    r = rescore_logits(x, [0, 1, 2, 3], SamplingParams(temperature=1.0, top_k=2), margin=0.0)
    q = np.array([0.4, 0.3]) / 0.7
    assert r.expected_logprob[0] == pytest.approx(float(q @ np.log([0.4, 0.3])), abs=1e-5)


def test_temperature_sharpens_the_expectation():
    x = _logits([[0.6, 0.3, 0.1]])
    hot = rescore_logits(x, [0], {"temperature": 1.0}).expected_logprob[0]
    cold = rescore_logits(x, [0], {"temperature": 0.5}).expected_logprob[0]
    assert cold > hot
    p = np.array([0.6, 0.3, 0.1])
    assert hot == pytest.approx(float(p @ np.log(p)), abs=1e-5)


def test_rescoring_on_the_engine_matches_its_score_call():
    eng = load_builtin_engine("tiny", max_batch=2)
    prompt, claimed = eng.encode("The market opens before"), eng.encode(" sunrise. Sellers bring")

    async def main():
        await eng.start()
        try:
            return await rescore(eng, prompt, claimed, {"temperature": 0.7, "top_p": 0.9}), \
                await eng.score(prompt, claimed)
        finally:
            await eng.close()

    r, score = asyncio.run(main())
    assert len(r) == len(claimed)
    assert r.logprob == pytest.approx(score, abs=1e-5)
    assert (r.top1_logprob >= r.logprob - 1e-6).all()
    direct = rescore_with_model(eng.model, prompt, claimed, {"temperature": 0.0})
    assert direct.logprob == pytest.approx(score, abs=1e-5)
    with pytest.raises(ValueError):
        rescore_with_model(eng.model, prompt, [10**6], {"temperature": 0.0})
    assert len(rescore_with_model(eng.model, prompt, [], {"temperature": 0.0})) == 0


def test_rescore_round_trips_through_plain_lists():
    import json

    from node_agent.rescoring import Rescore

    r = rescore_logits(_logits([[0.5, 0.3, 0.2]] * 3), [0, 1, 2], {"temperature": 1.0, "top_k": 2})
    back = Rescore.from_dict(json.loads(json.dumps(r.to_dict())))
    assert list(back.admissible) == list(r.admissible) and back.logprob == pytest.approx(r.logprob)
    bad = r.to_dict()
    bad["logprob"] = bad["logprob"][:1]
    with pytest.raises(ValueError):
        Rescore.from_dict(bad)
