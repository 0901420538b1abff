"""The node benchmark on the tiny model: figures, roofline, cache, callable inside a loop."""

from __future__ import annotations

import asyncio

import pytest

from node_agent.benchmark import measure_bandwidth, run_benchmark
from node_agent.engines.builtin import load_builtin_engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = load_builtin_engine("tiny", cache_dir=tmp_path_factory.mktemp("models"), max_batch=8)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())


def test_quick_benchmark_summary_and_cache(engine, tmp_path):
    res = run_benchmark(engine, quick=True, progress=False, cache_dir=tmp_path)
    s = res["summary"]
    assert s["tokens_per_s"] > 0 and s["tokens_per_s_b1"] > 0 and s["ttft_ms"] > 0
    assert [b["batch"] for b in res["batches"]] == [1, 8]
    for b in res["batches"]:
        assert b["generated_tokens"] == b["batch"] * res["gen_len"]
        assert b["prefill_tok_s"] > 0 and b["decode_tok_s"] > 0
    roof = res["roofline"]
    assert roof["weight_bytes"] > 0.5e6 * 4 and 0 < roof["fraction_b1"] < 1.5
    again = run_benchmark(engine, quick=True, progress=False, cache_dir=tmp_path)
    assert again["cached"] and again["summary"] == s
    # another build of the engine (here: the torch path instead of the native kernels)
    # is measured afresh, not served the other build's figures
    if engine.model.kernels is None:
        return  # no C compiler here: only one build exists
    kernels, engine.model.kernels = engine.model.kernels, None
    try:
        other = run_benchmark(engine, quick=True, progress=False, cache_dir=tmp_path)
    finally:
        engine.model.kernels = kernels
    assert not other.get("cached")


def test_benchmark_inside_a_running_loop(engine, tmp_path):
    async def agent_start():
        return run_benchmark(engine, batch_sizes=(1, 2), prompt_len=8, gen_len=6, progress=False,
                             cache_dir=tmp_path, repeats=1)

    res = asyncio.run(agent_start())
    assert res["summary"]["tokens_per_s"] > 0 and not res["cached"]


def test_bandwidth_is_plausible():
    assert 0.5e9 < measure_bandwidth("cpu", 64 << 20, 2) < 5e12
