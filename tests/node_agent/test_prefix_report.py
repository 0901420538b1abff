"""The node's prefix report: served prompts whose blocks the built-in engine's cache still
holds are reported under the coordinator's text prefix keys; evicted ones are withdrawn."""

from __future__ import annotations

import asyncio

import pytest

from node_agent.engines.base import GenerationRequest, SamplingParams
from node_agent.engines.builtin import BuiltinEngine
from node_agent.prefix_report import PrefixReport
from node_agent.tiny_model import generate_tiny_model
from protocol.prefix import prefix_chain


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return generate_tiny_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


def chat(*turns: str) -> dict:
    return {"messages": [{"role": "system", "content": "You answer briefly. " * 8}]
            + [{"role": "user", "content": t} for t in turns]}


async def serve(eng: BuiltinEngine, report: PrefixReport, payload: dict, rid: str) -> None:
    ids = eng.encode(eng.render_chat(payload["messages"]))
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    async for _ in eng.generate(GenerationRequest(rid, ids, sp)):
        pass
    report.served("tiny", payload, eng.prefix_keys(ids))


def test_report_names_held_prefixes_and_withdraws_evicted_ones(tiny_dir):
    async def run():
        probe = BuiltinEngine(tiny_dir, model_name="tiny", max_batch=2, max_seq_len=512)
        block_bytes = 2 * probe.model.cfg.num_layers * probe.model.cfg.num_kv_heads * 16 * probe.model.cfg.head_dim * 4
        # room for about one conversation's blocks: serving a second evicts the first
        n_first = len(probe.encode(probe.render_chat(chat("first question " * 6)["messages"]))) // 16
        eng = BuiltinEngine(tiny_dir, model_name="tiny", max_batch=2, max_seq_len=512,
                            prefix_cache_bytes=n_first * block_bytes)
        await eng.start()
        try:
            report = PrefixReport(eng.held_prefix_keys)
            first = chat("first question " * 6)
            await serve(eng, report, first, "r1")
            full = report.beat_fields(full=True)
            keys = [k.hex() for k, _ in prefix_chain("tiny", first)]
            assert full["prefix_full"] is True and set(keys) <= set(full["prefix_add"])
            assert report.beat_fields(full=False) == {}  # nothing changed: nothing sent
            await serve(eng, report, chat("final question " * 6), "r2")
            delta = report.beat_fields(full=False)
            # the system prompt's blocks were reused, the first question's evicted
            assert keys[-1] in delta.get("prefix_drop", [])
            assert keys[0] not in delta.get("prefix_drop", [])
            assert delta.get("prefix_add")
        finally:
            await eng.close()

    asyncio.run(run())


def test_report_is_bounded():
    held = {bytes([i]) * 16 for i in range(200)}
    report = PrefixReport(lambda: held, max_served=50, max_reported=20)
    for i in range(200):
        report.served("tiny", chat(f"q{i}"), [bytes([i]) * 16])
    out = report.beat_fields(full=True)["prefix_add"]
    assert len(out) == 20
    assert prefix_chain("tiny", chat("q199"))[-1][0].hex() in out  # the most recent first
