"""The agent's chunks and receipts for every kind of engine: replayed through the
coordinator's rules (chunks in order, a text-level count within the relayed bytes + 1,
`TokenCommitment.update_chunk` per chunk), every chunk is accepted and the signed receipt
matches what was relayed. Engines: the built-in one and OpenAI-compatible upstreams
(`bench/upstream.py` processes) with ids, token strings only, or text only."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from node_agent.agent import Chunker, NodeAgent, capabilities
from node_agent.engines.base import GenerationRequest, SamplingParams, TokenEvent
from node_agent.engines.builtin import load_builtin_engine
from node_agent.engines.openai_compat import OpenAICompatEngine
from node_agent.engines.throttle import ThrottledEngine
from node_agent.errors import EngineError
from node_agent.identity import Identity
from node_agent.settings import NodeSettings
from protocol import Assignment, Receipt, Sampling, TokenChunk, TokenCommitment, VerifyJob
from scheduler.verification import verify_rescored

PROMPT = "The market opens"  # answered with many tokens that add no text


class Relay:
    """What the coordinator's work channel checks, over the frames an agent sent."""

    def __init__(self, request_id: str):
        self.commitment = TokenCommitment(request_id)
        self.count = self.text_bytes = 0
        self.text = ""
        self.chunks: list[TokenChunk] = []

    def accept(self, chunk: TokenChunk) -> None:
        assert chunk.start == self.count, "out of order: never relayed"
        if chunk.token_ids is None:
            self.text_bytes += len(chunk.text.encode("utf-8", "surrogatepass"))
            assert self.count + chunk.n <= self.text_bytes + 1, "over the byte bound: refused"
        self.commitment.update_chunk(chunk.token_ids, chunk.logprobs, chunk.text, chunk.n)
        self.count += chunk.n
        self.text += chunk.text
        self.chunks.append(chunk)


class FakeSocket:
    def __init__(self):
        self.frames: list[dict] = []

    async def send(self, data: str) -> None:
        self.frames.append(json.loads(data))


def make_agent(eng, **settings) -> tuple[NodeAgent, FakeSocket]:
    agent = NodeAgent(NodeSettings(**settings), eng, Identity.generate(),
                      http=httpx.AsyncClient(base_url="http://127.0.0.1:9"))
    agent._ws = FakeSocket()
    return agent, agent._ws


def assignment(rid="req-1", max_tokens=40, kind="completion", **kw) -> Assignment:
    body = {"messages": [{"role": "user", "content": PROMPT}]} if kind == "chat" else {"prompt": PROMPT}
    return Assignment(request_id=rid, model="tiny", kind=kind, sampling=Sampling(max_tokens=max_tokens, temperature=0.0),
                      price_in=1, price_out=1, **body, **kw)


def relay(frames: list[dict], rid: str) -> tuple[Relay, Receipt]:
    r = Relay(rid)
    assert frames[-1]["type"] == "done", frames[-1]
    for f in frames[:-1]:
        r.accept(TokenChunk.model_validate(f))
    receipt = Receipt.model_validate(frames[-1]["receipt"])
    assert receipt.completion_tokens == r.count and receipt.commitment == r.commitment.hex
    return r, receipt


@pytest.fixture(scope="module")
def local():
    eng = load_builtin_engine("tiny", max_batch=4, max_seq_len=1024)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())


def engine_for(kind: str, ups, local):
    return local if kind == "builtin" else OpenAICompatEngine(ups[kind], model="tiny")


def reference(local, text=PROMPT, max_tokens=40):
    async def go():
        req = GenerationRequest("ref", local.encode(text), SamplingParams(max_tokens=max_tokens, temperature=0.0))
        return [ev async for ev in local.generate(req)]

    return asyncio.run(go())


@pytest.mark.parametrize("kind", ["builtin", "ids", "tokens", "text"])
@pytest.mark.parametrize("request_kind", ["completion", "chat"])
def test_chunks_and_receipt_agree_with_the_relay(ups, local, kind, request_kind):
    a = assignment(kind=request_kind)
    prompt_text = local.render_chat(a.messages) if request_kind == "chat" else PROMPT
    ref = reference(local, prompt_text)
    engine = engine_for(kind, ups, local)

    async def go():
        await engine.start()
        agent, ws = make_agent(engine)
        try:
            await agent._serve(a)
        finally:
            if engine is not local:
                await engine.close()
            await agent.close()
        return ws.frames

    r, receipt = relay(asyncio.run(go()), a.request_id)
    assert r.text == "".join(e.text for e in ref)
    assert receipt.completion_tokens == len(ref)  # the server's count, also when it named no token
    assert receipt.prompt_tokens == len(local.encode(prompt_text))  # the server's usage, not bytes
    ids = [c.token_ids is not None for c in r.chunks]
    lps = [c.logprobs is not None for c in r.chunks]
    if kind in ("builtin", "ids"):
        assert all(ids) and all(lps) and [t for c in r.chunks for t in c.token_ids] == [e.token_id for e in ref]
    else:
        assert not any(ids) and any(lps) == (kind == "tokens")


def test_tokens_without_text_wait_for_text_and_the_end_is_capped():
    c = Chunker("r")
    out = [c.add(TokenEvent(None, -0.5, "")) for _ in range(3)]
    assert out == [None, None, None]  # no text yet: the bound would refuse them
    first = c.add(TokenEvent(None, -0.1, "ab"))
    assert first.count == 2 and first.logprobs == [-5000, -5000]
    last = c.add(TokenEvent(None, None, "", "stop", count=5))
    assert last is None
    end = c.finish()
    assert end.count == 1 and end.text == "" and c.count == 3  # 2 bytes + 1: the rest is never claimed
    r = Relay("r")
    for chunk in (first, end):
        r.accept(chunk)
    assert r.commitment.hex == c.commitment.hex


def test_an_engine_that_stops_naming_its_tokens_fails_the_request():
    c = Chunker("r")
    assert c.add(TokenEvent(7, -0.2, "a")).token_ids == [7]
    with pytest.raises(EngineError, match="stopped naming"):
        c.add(TokenEvent(None, None, "b"))


@pytest.mark.parametrize("kind", ["builtin", "text"])
def test_failover_continues_after_the_text_and_spends_the_delivered_tokens(ups, local, kind):
    prompt = "def add(a, b):"  # every token of its answer adds text and none ends it early
    ref = reference(local, prompt, max_tokens=12)
    assert all(e.text for e in ref) and not any(e.finish_reason == "stop" for e in ref)
    head = "".join(e.text for e in ref[:5])
    a = Assignment(request_id="req-f", model="tiny", kind="completion", prompt=prompt,
                   sampling=Sampling(max_tokens=12, temperature=0.0), price_in=1, price_out=1,
                   prefix_text=head, prefix_tokens=5)
    engine = engine_for(kind, ups, local)

    async def go():
        await engine.start()
        agent, ws = make_agent(engine)
        try:
            await agent._serve(a)
        finally:
            if engine is not local:
                await engine.close()
        return ws.frames

    r, receipt = relay(asyncio.run(go()), a.request_id)
    assert receipt.completion_tokens == 7
    assert head + r.text == "".join(e.text for e in ref)


def test_exact_prefix_ids_continue_exactly(local):
    ref = reference(local, PROMPT, max_tokens=10)
    a = assignment("req-x", max_tokens=10, prefix_token_ids=[e.token_id for e in ref[:4]], prefix_tokens=4,
                   prefix_text="".join(e.text for e in ref[:4]))
    agent, ws = make_agent(local)
    asyncio.run(agent._serve(a))
    r, _ = relay(ws.frames, a.request_id)
    assert [t for c in r.chunks for t in c.token_ids] == [e.token_id for e in ref[4:]]


@pytest.mark.parametrize("kind", ["builtin", "ids"])
def test_any_engine_that_can_score_verifies(ups, local, kind):
    ref = reference(local, "Once upon a time", max_tokens=16)
    job = VerifyJob(audit_id=3, model="tiny", kind="completion", prompt="Once upon a time",
                    claimed_ids=[e.token_id for e in ref], sampling=Sampling(max_tokens=16, temperature=0.0))
    engine = engine_for(kind, ups, local)

    async def go():
        await engine.start()
        agent, ws = make_agent(ThrottledEngine(engine, 1000.0))  # wrappers verify with what they wrap
        try:
            await agent._verify(job)
        finally:
            if engine is not local:
                await engine.close()
        return ws.frames[-1]

    frame = asyncio.run(go())
    assert frame["type"] == "verify_result" and frame["error"] is None, frame
    verdict = verify_rescored(job.claimed_ids, [e.logprob for e in ref], frame["rescore"], job.sampling,
                              model="tiny", node_dtype="float32", verifier_dtype="float32",
                              finish_reason=ref[-1].finish_reason, eos_ids=frame["rescore"]["meta"]["eos_ids"],
                              receipt_tokens=len(ref))
    assert verdict.passed, verdict


def test_offers_say_what_the_engine_can_do_and_verifiers_sell_nothing(ups, local):
    async def go():
        text = OpenAICompatEngine(ups["text"], model="tiny")
        ids = OpenAICompatEngine(ups["ids"], model="tiny")
        await text.start()
        await ids.start()
        try:
            agent, ws = make_agent(ThrottledEngine(text, 50.0), engine="openai")
            offer = agent.registration().models[0]
            verifier, vws = make_agent(ids, verify_only=True, engine="openai")
            reg = verifier.registration()
            verifier._on_frame(assignment("req-v").model_dump(mode="json"))
            await asyncio.sleep(0.05)
            job = VerifyJob(audit_id=1, model="tiny", kind="completion", prompt="hi", claimed_ids=[5],
                            sampling=Sampling(temperature=0.0))
            await agent._verify(job)
            return offer, reg, vws.frames, ws.frames
        finally:
            await text.close()
            await ids.close()

    offer, reg, vframes, frames = asyncio.run(go())
    assert (offer.token_ids, offer.logprobs, offer.can_verify, offer.dtype) == (False, False, False, "float32")
    assert reg.verify_only and reg.models[0].price_in == reg.models[0].price_out == 0
    assert reg.models[0].can_verify and reg.models[0].max_context == 1024
    assert vframes == [{"type": "error", "request_id": "req-v", "code": "verify_only",
                        "message": "this node only verifies"}]
    assert "cannot verify" in frames[-1]["error"]
    assert capabilities(local) == dict(dtype="float32", quantization=None, token_ids=True, logprobs=True,
                                       can_verify=True)
