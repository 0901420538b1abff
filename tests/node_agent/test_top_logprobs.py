"""Top-k alternatives from the built-in engine (issue 16 item 3): an assignment that asks for
`top_logprobs` gets, per token, the k likeliest tokens best first, the chosen (greedy) token
among them with the same log-prob; the commitment and receipt are unchanged by them, and an
assignment that asks for none (or a node that predates the field) sends none."""

from __future__ import annotations

import asyncio
import math

from protocol import LOGPROB_SCALE, Sampling, TokenChunk
from tests.node_agent.test_agent_chunks import assignment, local, make_agent, relay  # noqa: F401


def _frames(engine, a):
    async def go():
        agent, ws = make_agent(engine)
        try:
            await agent._serve(a)
        finally:
            await agent.close()
        return ws.frames

    return asyncio.run(go())


def test_greedy_tokens_come_with_sorted_alternatives_that_contain_them(local):  # noqa: F811
    a = assignment(max_tokens=12)
    a.sampling = Sampling(max_tokens=12, temperature=0.0, top_logprobs=4)
    frames = _frames(local, a)
    r, receipt = relay(frames, a.request_id)  # the commitment ignores the alternatives: still agrees
    assert receipt.completion_tokens == len(r.chunks) > 0
    for chunk in r.chunks:
        assert chunk.top_logprobs is not None and len(chunk.top_logprobs) == 1
        alts = chunk.top_logprobs[0]
        assert len(alts) == 4
        values = [alt.logprob for alt in alts]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert alts[0].token_id == chunk.token_ids[0]  # greedy: the likeliest is the one chosen
        assert alts[0].logprob == chunk.logprobs[0]
        assert alts[0].text == local.decode([chunk.token_ids[0]])
        assert sum(math.exp(v / LOGPROB_SCALE) for v in values) <= 1.0 + 1e-3


def test_no_alternatives_unless_asked(local):  # noqa: F811
    frames = _frames(local, assignment(max_tokens=6))
    chunks = [TokenChunk.model_validate(f) for f in frames[:-1]]
    assert chunks and all(c.top_logprobs is None for c in chunks)
    assert all(c.logprobs is not None for c in chunks)  # the chosen tokens' log-probs are always sent
    assert "top_logprobs" not in assignment().sampling.model_dump(exclude_defaults=True)


def test_an_openai_compatible_upstreams_top_logprobs_pass_through_best_first():
    from node_agent.engines.openai_compat import OpenAICompatEngine
    from node_agent.tiny_model import resolve_model

    eng = OpenAICompatEngine("http://127.0.0.1:9/v1", model="tiny", tokenizer_dir=resolve_model("tiny"))
    a, b = eng.encode("a")[0], eng.encode("b")[0]
    choice = {"text": "a", "logprobs": {"tokens": [f"token_id:{a}"], "token_logprobs": [-0.5],
                                        "top_logprobs": [{f"token_id:{b}": -1.5, f"token_id:{a}": -0.5}]}}
    ev = eng._events(choice, top_k=2)[0]
    assert ev.token_id == a and ev.top == [(a, eng.decode([a]), -0.5), (b, eng.decode([b]), -1.5)]
    assert eng._events(choice, top_k=1)[0].top == [(a, eng.decode([a]), -0.5)]
    assert eng._events(choice)[0].top is None  # not asked
    bare = OpenAICompatEngine("http://127.0.0.1:9/v1", model="tiny")  # ids it cannot spell: left out, not invented
    assert bare._events(choice, top_k=2)[0].top == []
