"""OpenAICompatEngine against real `bench/upstream.py` processes in each of its modes (vLLM
style with ids, token strings only, text only), without a local tokenizer unless a test
says so: what the probe detects, that no id is ever invented, that counts match the
server's, that rescoring through `echo` agrees with the built-in engine's and passes the
coordinator's verification check."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from node_agent.engines.base import GenerationRequest, SamplingParams
from node_agent.engines.builtin import load_builtin_engine
from node_agent.engines.openai_compat import OpenAICompatEngine
from node_agent.errors import EngineError, RequestTooLong
from node_agent.tiny_model import resolve_model
from protocol import LOGPROB_SCALE, quantize_logprob
from scheduler.verification import verify_rescored
from tests.node_agent.upstreams import free_port

PROMPT = "The market opens"  # the tiny model answers it with many tokens that add no text


@pytest.fixture(scope="module")
def local():
    """The same model in this process: the reference."""
    eng = load_builtin_engine("tiny", max_batch=4, max_seq_len=1024)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())


def run(coro):
    return asyncio.run(coro)


async def started(url, **kw) -> OpenAICompatEngine:
    eng = OpenAICompatEngine(url, model=kw.pop("model", "tiny"), **kw)
    await eng.start()
    return eng


async def collect(engine, prompt_ids, rid="r", **sp):
    sp.setdefault("temperature", 0.0)
    return [ev async for ev in engine.generate(GenerationRequest(rid, prompt_ids, SamplingParams(**sp)))]


def reference(local, text=PROMPT, **sp):
    return run(collect(local, local.encode(text), **sp))


def test_the_probe_detects_what_each_upstream_offers(ups):
    async def caps(url, **kw):
        eng = await started(url, **kw)
        await eng.close()
        return eng

    ids, tokens, text = (run(caps(ups[m])) for m in ("ids", "tokens", "text"))
    assert (ids.server_ids, ids.token_ids, ids.logprobs, ids.can_verify) == (True, True, True, True)
    assert (tokens.token_ids, tokens.logprobs, tokens.can_verify) == (False, True, False)
    assert (text.token_ids, text.logprobs, text.can_verify) == (False, False, False)
    # What /v1/models says wins over flags; a server that says nothing is bfloat16 unless told.
    assert (ids.dtype, ids.max_context, ids.vocab_size) == ("float32", 1024, 512)
    assert run(caps(ups["ids"], dtype="float16")).dtype == "float32"
    assert run(caps(ups["fixed"], model="tiny")).dtype == "bfloat16"
    told = run(caps(ups["fixed"], model="tiny", dtype="float16", quantization="awq"))
    assert (told.dtype, told.quantization) == ("float16", "awq")


def test_ids_mode_streams_the_engines_own_ids_and_logprobs(ups, local):
    ref = reference(local, max_tokens=24)

    async def go():
        eng = await started(ups["ids"])
        try:
            return await collect(eng, eng.encode(PROMPT), max_tokens=24), eng.take_usage("r")
        finally:
            await eng.close()

    got, usage = run(go())
    assert [e.token_id for e in got] == [e.token_id for e in ref]
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in ref], abs=1e-5)
    assert "".join(e.text for e in got) == "".join(e.text for e in ref)
    assert got[-1].finish_reason == ref[-1].finish_reason and all(e.count == 1 for e in got)
    assert usage["prompt_tokens"] == len(local.encode(PROMPT)) and usage["completion_tokens"] == len(ref)


@pytest.mark.parametrize("mode", ["tokens", "text"])
def test_without_ids_no_id_is_invented_and_the_count_is_the_servers(ups, local, mode):
    ref = reference(local, max_tokens=40)
    assert sum(1 for e in ref if not e.text) >= 5  # the case that needs the server's count

    async def go():
        eng = await started(ups[mode])
        try:
            return await collect(eng, eng.encode(PROMPT), max_tokens=40), eng.take_usage("r")
        finally:
            await eng.close()

    got, usage = run(go())
    assert all(e.token_id is None for e in got)
    assert "".join(e.text for e in got) == "".join(e.text for e in ref)
    assert sum(e.count for e in got) == len(ref) == usage["completion_tokens"]
    assert usage["prompt_tokens"] == len(local.encode(PROMPT))
    assert got[-1].finish_reason == "length" and all(e.finish_reason is None for e in got[:-1])
    if mode == "tokens":
        assert [e.logprob for e in got] == pytest.approx([e.logprob for e in ref], abs=1e-5)
    else:
        assert all(e.logprob is None for e in got) and got[-1].count > 1 and got[-1].text == ""


def test_a_local_tokenizer_gives_exact_ids_and_scores(ups, local):
    ref = reference(local, max_tokens=12)

    async def go():
        eng = await started(ups["ids"], tokenizer_dir=resolve_model("tiny"))
        try:
            prompt = eng.encode(PROMPT)
            got = await collect(eng, prompt, max_tokens=12)
            stopped = await collect(eng, prompt, max_tokens=12, stop=["".join(e.text for e in ref)[2:4]])
            return got, await eng.score(prompt, [e.token_id for e in ref]), stopped
        finally:
            await eng.close()

    got, scores, stopped = run(go())
    assert [e.token_id for e in got] == [e.token_id for e in ref]
    assert scores == pytest.approx([e.logprob for e in ref], abs=1e-4)
    assert stopped[-1].finish_reason == "stop" and len(stopped) < len(ref)


def test_a_text_prefix_continues_and_spends_the_delivered_budget(ups, local):
    """Failover from text: generation continues after the text and max_tokens counts the
    tokens delivered before, not the bytes of the prefix."""
    ref = reference(local, "Once upon a time", max_tokens=10, ignore_eos=True)
    head = "".join(e.text for e in ref[:4])

    async def go():
        eng = await started(ups["ids"])
        try:
            req = GenerationRequest.continuing("r", eng.encode("Once upon a time"),
                                               SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True),
                                               eng.encode(head), delivered=4)
            return [ev async for ev in eng.generate(req)]
        finally:
            await eng.close()

    got = run(go())
    assert len(got) == 6
    assert head + "".join(e.text for e in got) == "".join(e.text for e in ref)


@pytest.mark.parametrize("tokenizer", [False, True])
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 0.8, "top_p": 0.9}])
def test_rescore_through_echo_agrees_with_the_builtin_engine(ups, local, tokenizer, sampling):
    prompt_text = "Once upon a time"
    sp = SamplingParams(max_tokens=24, seed=3, **sampling)
    ref = run(collect(local, local.encode(prompt_text), **sp.__dict__))
    claimed = [e.token_id for e in ref]

    async def go():
        eng = await started(ups["ids"], tokenizer_dir=resolve_model("tiny") if tokenizer else None)
        try:
            return await eng.rescore(eng.encode(prompt_text), claimed, sp)
        finally:
            await eng.close()

    got = run(go())
    want = run(local.rescore(local.encode(prompt_text), claimed, sp))
    assert np.allclose(got.logprob, want.logprob, atol=1e-4)
    assert list(got.top1_id) == list(want.top1_id) and list(got.admissible) == list(want.admissible)
    tol = 1e-4 if sampling["temperature"] == 0 else 0.05  # sampled: exact up to the unseen tail
    assert np.abs(got.expected_logprob - want.expected_logprob).mean() < tol
    claimed_lps = np.array([quantize_logprob(e.logprob) for e in ref]) / LOGPROB_SCALE
    verdict = verify_rescored(claimed, claimed_lps, got.to_dict(), sp, model="tiny", node_dtype="float32",
                              verifier_dtype="float32", finish_reason=ref[-1].finish_reason,
                              eos_ids=sorted(local.eos_ids), receipt_tokens=len(claimed))
    assert verdict.passed, verdict


def test_engines_that_cannot_verify_say_so(ups):
    async def go(url):
        eng = await started(url)
        try:
            with pytest.raises(EngineError, match="cannot verify"):
                await eng.rescore(eng.encode("hello"), [5, 6], SamplingParams(temperature=0.0))
        finally:
            await eng.close()

    run(go(ups["tokens"]))
    run(go(ups["text"]))


def test_upstream_failures_become_engine_errors(ups):
    async def go():
        eng = await started(ups["ids"])
        try:
            with pytest.raises(RequestTooLong, match="maximum context length"):
                await collect(eng, eng.encode("word " * 1100), max_tokens=4)
        finally:
            await eng.close()
        with pytest.raises(EngineError, match="unreachable"):
            await OpenAICompatEngine(f"http://127.0.0.1:{free_port()}/v1", model="tiny").start()
        with pytest.raises(EngineError, match="does not serve 'other'"):
            await OpenAICompatEngine(ups["ids"], model="other").start()

    run(go())
