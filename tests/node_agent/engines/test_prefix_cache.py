"""Prefix KV cache and chunked prefill of the built-in engine: greedy output identical with
and without them, eviction under a tiny budget, a prefix shared by concurrent requests, the
cache dropped on restart, the switches, and the native kernel's chunked attention against a
whole-prompt reference."""

from __future__ import annotations

import asyncio
import math
import random

import pytest
import torch

from node_agent.engines.base import GenerationRequest, SamplingParams
from node_agent.engines.builtin import BuiltinEngine, native
from node_agent.engines.builtin.engine import MIN_CHUNK
from node_agent.engines.builtin.prefix_cache import chain_hashes
from node_agent.errors import EngineError
from node_agent.tiny_model import generate_tiny_model

N = 12  # generated tokens per request


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return generate_tiny_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


def make(tiny_dir, **kw) -> BuiltinEngine:
    kw.setdefault("max_batch", 8)
    kw.setdefault("max_seq_len", 1024)
    return BuiltinEngine(tiny_dir, model_name="tiny", **kw)


async def gen(eng, prompt, rid="r", n=N):
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [(e.token_id, e.logprob) async for e in eng.generate(GenerationRequest(rid, prompt, sp))]


def ids(out):
    return [t for t, _ in out]


def workload(seed=0):
    """Prompts sharing a 70-token system prompt, two of them prefixes of others."""
    rng = random.Random(seed)
    system = [rng.randrange(3, 500) for _ in range(70)]
    prompts = [system + [rng.randrange(3, 500) for _ in range(rng.randint(1, 40))] for _ in range(5)]
    return prompts + [prompts[0][:48], prompts[1][:33], [rng.randrange(3, 500) for _ in range(20)]]


async def scenario(eng, prompts):
    """One by one, then the next chat turn of each (prompt + answer + new tokens), then all
    of them at once (a prefix shared by concurrent requests)."""
    await eng.start()
    try:
        first = [await gen(eng, p, f"a{i}") for i, p in enumerate(prompts)]
        turns = [p + ids(o) + [7, 8, 9] for p, o in zip(prompts, first)]
        second = [await gen(eng, p, f"b{i}") for i, p in enumerate(turns)]
        both = await asyncio.gather(*(gen(eng, p, f"c{i}") for i, p in enumerate(prompts + turns)))
        return first + second + list(both), eng.prefix_stats()
    finally:
        await eng.close()


@pytest.fixture(scope="module")
def reference(tiny_dir):
    outs, stats = asyncio.run(scenario(make(tiny_dir, prefix_cache=False, prefill_chunk=0), workload()))
    assert stats == {"enabled": False}
    return outs


def assert_same(outs, reference):
    assert [ids(o) for o in outs] == [ids(o) for o in reference]
    # K/V of generated tokens come from decode steps: rounding-level differences only
    assert max(abs(a - b) for o, r in zip(outs, reference) for (_, a), (_, b) in zip(o, r)) < 1e-4


def test_cache_on_gives_the_same_greedy_output_and_reuses_prefixes(tiny_dir, reference):
    outs, stats = asyncio.run(scenario(make(tiny_dir, prefix_cache=True, prefill_chunk=0), workload()))
    assert_same(outs, reference)
    assert stats["enabled"] and stats["evicted_blocks"] == 0
    # the system prompt (4 whole blocks) is reused from the second prompt on; every next turn
    # reuses its whole previous prompt and answer
    assert stats["hit_tokens"] > 0.5 * stats["lookup_tokens"]


def test_tiny_budget_evicts_and_never_serves_a_wrong_block(tiny_dir, reference):
    eng = make(tiny_dir, prefix_cache=True, prefill_chunk=0)
    block_bytes = eng.prefix_block * 2 * 4 * 2 * 32 * 4  # layers 4, kv heads 2, head_dim 32, fp32
    eng = make(tiny_dir, prefix_cache=True, prefix_cache_bytes=3 * block_bytes, prefill_chunk=0)
    outs, stats = asyncio.run(scenario(eng, workload()))
    assert_same(outs, reference)
    assert stats["capacity_blocks"] == 3 and stats["blocks"] <= 3
    assert stats["evicted_blocks"] > 0 and stats["hit_tokens"] > 0


def test_concurrent_requests_share_a_prefix_cached_while_they_run(tiny_dir):
    async def run(cache: bool):
        eng = make(tiny_dir, prefix_cache=cache, prefill_chunk=0, max_batch=4)
        await eng.start()
        try:
            rng = random.Random(5)
            system = [rng.randrange(3, 500) for _ in range(64)]
            # more requests than slots: later ones are admitted while earlier ones still run,
            # and copy the shared blocks stored when the first prompt was prefilled
            prompts = [system + [rng.randrange(3, 500) for _ in range(5 + i)] for i in range(10)]
            outs = await asyncio.gather(*(gen(eng, p, f"q{i}", n=20) for i, p in enumerate(prompts)))
            return outs, eng.prefix_stats()
        finally:
            await eng.close()

    off, _ = asyncio.run(run(False))
    on, stats = asyncio.run(run(True))
    assert [ids(o) for o in on] == [ids(o) for o in off]
    assert stats["hit_tokens"] >= 6 * 64  # the 6 requests admitted after the first batch


def test_chunked_prefill_gives_the_same_output_while_streams_decode(tiny_dir):
    rng = random.Random(11)
    longs = [[rng.randrange(3, 500) for _ in range(n)] for n in (300, 171)]
    short = [[rng.randrange(3, 500) for _ in range(8)] for _ in range(3)]

    async def run(chunk: int):
        eng = make(tiny_dir, prefix_cache=False, prefill_chunk=chunk, max_batch=6)
        await eng.start()
        try:
            streams = [asyncio.create_task(gen(eng, p, f"s{i}", n=60)) for i, p in enumerate(short)]
            await asyncio.sleep(0.05)  # the streams are decoding when the long prompts arrive
            outs = await asyncio.gather(*(gen(eng, p, f"l{i}") for i, p in enumerate(longs)))
            return list(outs) + list(await asyncio.gather(*streams))
        finally:
            await eng.close()

    whole = asyncio.run(run(0))
    for chunk in (16, 50):
        chunked = asyncio.run(run(chunk))
        assert [ids(o) for o in chunked] == [ids(o) for o in whole], chunk
        assert max(abs(a - b) for o, r in zip(chunked, whole) for (_, a), (_, b) in zip(o, r)) < 1e-4


def test_chunked_prefill_interleaves_with_decode_steps(tiny_dir):
    """While a long prompt is prefilled in chunks, the running stream keeps getting tokens."""
    async def run():
        eng = make(tiny_dir, prefix_cache=False, prefill_chunk=16, max_batch=2)
        await eng.start()
        try:
            order = []

            async def stream():
                sp = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
                async for _ in eng.generate(GenerationRequest("s", [5, 6, 7], sp)):
                    order.append("s")

            task = asyncio.create_task(stream())
            while len(order) < 3:
                await asyncio.sleep(0.001)
            prompt = [random.Random(2).randrange(3, 500) for _ in range(400)]
            order.append("arrive")
            async for _ in eng.generate(GenerationRequest("l", prompt, SamplingParams(max_tokens=1))):
                order.append("first")
            await task
            return order
        finally:
            await eng.close()

    order = asyncio.run(run())
    during = order.index("first") - order.index("arrive") - 1
    assert during >= 400 // 16 - 2  # about one stream token per 16-token chunk


def test_cache_is_dropped_on_restart_and_keys_depend_on_the_model(tiny_dir, tmp_path):
    async def run():
        eng = make(tiny_dir, prefix_cache=True)
        prompt = list(range(3, 100))
        await eng.start()
        await gen(eng, prompt)
        assert eng.prefix_stats()["blocks"] > 0 and eng.prefix_block_keys()
        await eng.close()
        assert eng.prefix_cache is None or len(eng.prefix_cache) == 0
        await eng.start()  # a restart (as after a model reload) begins empty
        stats = eng.prefix_stats()
        assert stats["blocks"] == 0 and stats["hit_tokens"] == 0
        out = await gen(eng, prompt)
        assert eng.prefix_stats()["hit_tokens"] == 0
        await eng.close()
        return out

    asyncio.run(run())
    other = generate_tiny_model(tmp_path / "other", "tiny", seed=1)
    a, b = make(tiny_dir), make(other)
    assert a._cache_seed != b._cache_seed  # other weights: other block keys
    assert chain_hashes(a._cache_seed, list(range(40)), 16, [], 2) != chain_hashes(b._cache_seed, list(range(40)),
                                                                                    16, [], 2)


def test_switches(tiny_dir, monkeypatch):
    monkeypatch.setenv("AGORA_NODE_PREFIX_CACHE", "false")
    monkeypatch.setenv("AGORA_NODE_PREFILL_CHUNK", "0")
    eng = make(tiny_dir)
    assert eng.prefix_cache_bytes == 0 and eng.prefill_chunk == 0
    asyncio.run(eng.start())
    assert eng.prefix_stats() == {"enabled": False}
    asyncio.run(eng.close())
    monkeypatch.delenv("AGORA_NODE_PREFIX_CACHE")
    monkeypatch.delenv("AGORA_NODE_PREFILL_CHUNK")
    eng = make(tiny_dir)  # the cache and chunking on by default (engine.py: DEFAULT_PREFILL_CHUNK)
    assert eng.prefix_cache_bytes > 0 and eng.prefill_chunk == 64 and eng.itl_slack == 1.5
    monkeypatch.setenv("AGORA_NODE_PREFIX_CACHE", "true")
    monkeypatch.setenv("AGORA_NODE_PREFIX_CACHE_MB", "1")
    monkeypatch.setenv("AGORA_NODE_PREFILL_CHUNK", "48")
    eng = make(tiny_dir)
    assert eng.prefix_cache_bytes == 1 << 20 and eng.prefill_chunk == 48
    assert make(tiny_dir, prefix_cache=False).prefix_cache_bytes == 0  # the argument wins
    with pytest.raises(EngineError):
        make(tiny_dir, prefill_chunk=-1)


def test_chain_hashes_name_the_whole_prefix():
    a = chain_hashes(b"s", [1] * 16 + [2] * 16, 16, [], 2)
    b = chain_hashes(b"s", [3] * 16 + [2] * 16, 16, [], 2)
    assert a[0] != b[0] and a[1] != b[1]  # same second block, other first block: other key
    assert chain_hashes(b"s", [1] * 16 + [2] * 16 + [4] * 5, 16, list(a[:1]), 2) == a  # memoised extension


@pytest.mark.skipif(native.load() is None, reason="native kernels unavailable here")
def test_native_cache_attention_matches_whole_prompt_attention():
    """Rows continued after earlier positions of a slot attend exactly like the same rows
    of a whole-prompt pass."""
    kernels = native.load()
    torch.manual_seed(0)
    heads, kvh, hd, max_len, n = 4, 2, 32, 128, 75
    q = torch.randn(n, heads, hd)
    k, v = torch.randn(n, kvh, hd), torch.randn(n, kvh, hd)
    whole = kernels.prefill_attention(q, k, v, [n], 1 / math.sqrt(hd))
    kc, vc = torch.zeros(3, kvh, max_len, hd), torch.zeros(3, kvh, max_len, hd)
    kc[2, :, :n], vc[2, :, :n] = k.transpose(0, 1), v.transpose(0, 1)
    for cut in (0, 1, 16, 33, 74):
        part = kernels.prefill_cache_attention(q[cut:].contiguous(), kc, vc, [(2, cut, n - cut)], 1 / math.sqrt(hd))
        assert torch.equal(part, whole[cut:]), cut
    # two pieces in one call, one of them from position 0
    both = kernels.prefill_cache_attention(torch.cat([q[40:], q[:10]]).contiguous(), kc, vc,
                                           [(2, 40, n - 40), (2, 0, 10)], 1 / math.sqrt(hd))
    assert torch.equal(both, torch.cat([whole[40:], whole[:10]]))
    with pytest.raises(ValueError):
        kernels.prefill_cache_attention(q[:10].contiguous(), kc, vc, [(2, max_len - 5, 10)], 1.0)


@pytest.mark.skipif(native.load() is None, reason="native kernels unavailable here")
def test_small_chunks_take_the_row_path_with_the_tile_paths_arithmetic():
    """Pieces of at most 4 rows (the small chunks an ITL budget cuts near the end of a long
    prompt) are computed row by row; every row comes out bit for bit as in one whole piece,
    and close to a plain softmax reference."""
    kernels = native.load()
    torch.manual_seed(1)
    heads, kvh, hd, max_len, n, at = 8, 4, 64, 1200, 23, 1100
    kc, vc = torch.randn(2, kvh, max_len, hd), torch.randn(2, kvh, max_len, hd)
    q = torch.randn(n, heads, hd)
    scale = 1 / math.sqrt(hd)
    whole = kernels.prefill_cache_attention(q, kc, vc, [(1, at, n)], scale)
    if whole is None:
        pytest.skip("the prefill kernel needs AVX-512, which this CPU lacks")
    for size in (1, 2, 3, 4):
        parts = [kernels.prefill_cache_attention(q[a:a + size].contiguous(), kc, vc,
                                                 [(1, at + a, min(size, n - a))], scale) for a in range(0, n, size)]
        assert torch.equal(torch.cat(parts), whole), size
    rows = []
    for i in range(n):
        for h in range(heads):
            keys, vals = kc[1, h // (heads // kvh), :at + i + 1], vc[1, h // (heads // kvh), :at + i + 1]
            rows.append(torch.softmax(keys @ q[i, h] * scale, 0) @ vals)
    assert torch.allclose(whole, torch.stack(rows).reshape(n, heads, hd), atol=2e-5)


def test_itl_budget_steers_the_staged_chunk(tiny_dir, monkeypatch):
    """With streams decoding, the staged prompt's chunk shrinks when an iteration carrying it
    took more than `itl_slack` times a decode-only one and grows back (at most to
    `prefill_chunk`) when it was cheap; it never drops below MIN_CHUNK rows."""
    eng = make(tiny_dir, prefix_cache=False, prefill_chunk=64, itl_slack=1.5)
    steer, staged = eng.steer, object()
    for _ in range(5):
        steer.timed(0.010, True, [], staged)  # decode-only iterations: 10 ms
    assert steer.decode_s == pytest.approx(0.010)
    steer.timed(0.040, True, [(staged, 0, 64)], staged)  # 30 ms extra where 5 ms was the budget
    assert steer.rows(64, False) == int(64 * (5 / 30) ** 0.5) < 64
    steer.timed(0.011, True, [(staged, 64, 64 + steer.rows(64, False))], staged)  # cheap: it grows, by at most 2x
    assert steer.rows(64, False) == 2 * int(64 * (5 / 30) ** 0.5)
    for _ in range(10):
        steer.timed(0.001, True, [(staged, 0, steer.rows(64, False))], staged)
    assert steer.rows(64, False) == 64  # capped at prefill_chunk
    for _ in range(20):
        steer.timed(1.0, True, [(staged, 0, steer.rows(64, False))], staged)
    assert steer.rows(64, False) == MIN_CHUNK  # the floor: the long prompt's own prefill stays bounded
    # a queue behind it: the per-iteration budget, not the ITL steering
    assert steer.rows(64, True) == 64 and steer.rows(640, True) == 640
    fixed = make(tiny_dir, prefix_cache=False, prefill_chunk=64, itl_slack=0).steer
    fixed.timed(0.010, True, [], staged)
    fixed.timed(1.0, True, [(staged, 0, 64)], staged)
    assert fixed.rows(64, False) == 64  # slack 0: fixed chunks
    monkeypatch.setenv("AGORA_NODE_ITL_SLACK", "2.5")
    assert make(tiny_dir).itl_slack == 2.5
    with pytest.raises(EngineError):
        make(tiny_dir, itl_slack=0.5)
