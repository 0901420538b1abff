"""OpenAICompatEngine against a real local HTTP server: a small OpenAI-compatible app
(FastAPI + uvicorn on 127.0.0.1) that serves the built-in engine."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest

from node_agent.engines.base import GenerationRequest, SamplingParams
from node_agent.engines.builtin import BuiltinEngine
from node_agent.engines.openai_compat import OpenAICompatEngine
from node_agent.errors import EngineError, RequestTooLong
from node_agent.tiny_model import generate_tiny_model

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")


def make_app(engine: BuiltinEngine, state: dict):
    from fastapi.responses import JSONResponse, StreamingResponse

    app = fastapi.FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "tiny", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(body: dict):
        if state.get("fail"):
            return JSONResponse({"error": {"message": "GPU fell off the bus"}}, status_code=500)
        prompt = body["prompt"]
        ids = prompt if isinstance(prompt, list) else engine.encode(prompt)
        if len(ids) + body.get("max_tokens", 16) > engine.max_seq_len:
            msg = f"This model's maximum context length is {engine.max_seq_len} tokens"
            return JSONResponse({"error": {"message": msg}}, status_code=400)
        if body.get("echo"):
            scores = await engine.score(ids[:1], ids[1:])
            return {"choices": [{"text": "", "logprobs": {"token_logprobs": [None] + scores}}]}
        sp = SamplingParams(max_tokens=body.get("max_tokens", 16), temperature=body.get("temperature", 1.0),
                            top_p=body.get("top_p", 1.0), top_k=body.get("top_k", 0), seed=body.get("seed"),
                            stop=body.get("stop") or [], ignore_eos=body.get("ignore_eos", False))
        want_lp = body.get("logprobs") is not None and state.get("logprobs", True)

        async def sse():
            n = 0
            async for ev in engine.generate(GenerationRequest("up", ids, sp)):
                n += 1
                lp = {"tokens": [f"token_id:{ev.token_id}"], "token_logprobs": [ev.logprob]} if want_lp else None
                choice = {"index": 0, "text": ev.text, "logprobs": lp, "finish_reason": None}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
                if ev.finish_reason:
                    done = {"index": 0, "text": "", "logprobs": None, "finish_reason": ev.finish_reason}
                    yield f"data: {json.dumps({'choices': [done]})}\n\n"
            usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    folder = generate_tiny_model(tmp_path_factory.mktemp("tiny"), "tiny")
    engine = BuiltinEngine(folder, model_name="tiny", max_batch=4, max_seq_len=256)
    asyncio.run(engine.start())
    state: dict = {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(engine, state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    yield {"url": f"http://127.0.0.1:{port}/v1", "engine": engine, "folder": folder, "state": state}
    server.should_exit = True
    thread.join(10)
    asyncio.run(engine.close())


async def collect(engine, prompt, **sp):
    sp.setdefault("temperature", 0.0)
    return [ev async for ev in engine.generate(GenerationRequest("r", prompt, SamplingParams(**sp)))]


def test_streams_same_tokens_and_logprobs_as_the_engine_behind_it(upstream):
    local = upstream["engine"]

    async def run():
        remote = OpenAICompatEngine(upstream["url"], tokenizer_dir=upstream["folder"])
        await remote.start()
        try:
            prompt = remote.encode("Once upon a time")
            got = await collect(remote, prompt, max_tokens=12, ignore_eos=True)
            ref = await collect(local, prompt, max_tokens=12, ignore_eos=True)
            scores = await remote.score(prompt, [e.token_id for e in ref])
            stopped = await collect(remote, prompt, max_tokens=12, ignore_eos=True,
                                    stop=["".join(e.text for e in ref)[4:6]])
            return remote, got, ref, scores, stopped
        finally:
            await remote.close()

    remote, got, ref, scores, stopped = asyncio.run(run())
    assert remote.model_name == "tiny" and remote.logprobs_available
    assert [e.token_id for e in got] == [e.token_id for e in ref]
    assert [e.logprob for e in got] == pytest.approx([e.logprob for e in ref], abs=1e-6)
    assert "".join(e.text for e in got) == "".join(e.text for e in ref)
    assert got[-1].finish_reason == "length" and all(e.finish_reason is None for e in got[:-1])
    assert scores == pytest.approx([e.logprob for e in ref], abs=1e-3)
    assert stopped[-1].finish_reason == "stop"
    assert remote.usage["r"]["completion_tokens"] == len(stopped)  # the last request's usage


def test_without_tokenizer_or_logprobs(upstream):
    upstream["state"]["logprobs"] = False

    async def run():
        remote = OpenAICompatEngine(upstream["url"], model="tiny")
        await remote.start()
        try:
            prompt = remote.encode("Hello there")
            assert remote.decode(prompt) == "Hello there"
            return remote, await collect(remote, prompt, max_tokens=6, ignore_eos=True)
        finally:
            await remote.close()

    try:
        remote, evs = asyncio.run(run())
    finally:
        upstream["state"]["logprobs"] = True
    assert not remote.logprobs_available
    assert all(e.logprob == 0.0 for e in evs) and evs[-1].finish_reason == "length"
    assert remote.usage["r"]["completion_tokens"] == 6


def test_upstream_failures_become_engine_errors(upstream):
    async def run():
        remote = OpenAICompatEngine(upstream["url"], tokenizer_dir=upstream["folder"])
        await remote.start()
        try:
            with pytest.raises(RequestTooLong, match="maximum context length"):
                await collect(remote, [5] * 300, max_tokens=4)
            upstream["state"]["fail"] = True
            with pytest.raises(EngineError, match="GPU fell off the bus"):
                await collect(remote, [5, 6, 7], max_tokens=4)
        finally:
            upstream["state"]["fail"] = False
            await remote.close()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        with pytest.raises(EngineError, match="unreachable"):
            await OpenAICompatEngine(f"http://127.0.0.1:{dead}/v1").start()
        with pytest.raises(EngineError, match="does not serve"):
            await OpenAICompatEngine(upstream["url"], model="other").start()

    asyncio.run(run())
