"""The built-in engine against transformers on the same weights, plus batching, sampling,
stop strings, failover continuation, scoring, cancellation and failure handling."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch

from node_agent.engines.base import GenerationRequest, SamplingParams
from node_agent.engines.builtin import BuiltinEngine, load_builtin_engine
from node_agent.errors import EngineError, ModelLoadError, RequestTooLong
from node_agent.tiny_model import generate_tiny_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return generate_tiny_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=0)


@pytest.fixture(scope="module")
def engine(tiny_dir):
    eng = BuiltinEngine(tiny_dir, model_name="tiny", max_batch=8, max_seq_len=512)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())


def prompts(engine, n=4):
    texts = ["The market opens", "Once upon a time there was", "def add(a, b):", "Hello"]
    return [engine.encode(t) for t in (texts * 3)[:n]]


async def collect(engine, prompt, req_id="r", **sp):
    sp.setdefault("temperature", 0.0)
    return [ev async for ev in engine.generate(GenerationRequest(req_id, prompt, SamplingParams(**sp)))]


def hf_greedy(folder, prompt, n):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
        logits = model(out).logits[0].float()
    new = out[0, len(prompt):].tolist()
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(1, torch.tensor(new)[:, None])[:, 0]
    return new, lp.tolist()


def test_greedy_matches_transformers_and_logprobs_match_reference(engine, tiny_dir):
    for i, p in enumerate(prompts(engine)):
        evs = asyncio.run(collect(engine, p, max_tokens=24, ignore_eos=True))
        ref_ids, ref_lp = hf_greedy(tiny_dir, p, 24)
        assert [e.token_id for e in evs] == ref_ids, f"prompt {i}"
        assert max(abs(e.logprob - r) for e, r in zip(evs, ref_lp)) < 1e-3
        assert evs[-1].finish_reason == "length" and all(e.finish_reason is None for e in evs[:-1])


def test_folder_saved_by_transformers(tmp_path, tiny_dir):
    """A Qwen2-style checkpoint (q/k/v biases, untied head, GQA, other rope_theta) written by
    transformers' own save_pretrained loads and generates exactly like transformers."""
    cfg = transformers.Qwen2Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256, rope_theta=50000.0,
        tie_word_embeddings=False, initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("bias"):
                prm.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    eng = BuiltinEngine(tmp_path, max_batch=2)

    async def run():
        await eng.start()
        try:
            return await collect(eng, [5, 17, 300, 42, 9], max_tokens=16, ignore_eos=True)
        finally:
            await eng.close()

    evs = asyncio.run(run())
    ref_ids, ref_lp = hf_greedy(tmp_path, [5, 17, 300, 42, 9], 16)
    assert [e.token_id for e in evs] == ref_ids
    assert max(abs(e.logprob - r) for e, r in zip(evs, ref_lp)) < 1e-3


def test_greedy_output_does_not_depend_on_batch_mates(engine):
    ps = prompts(engine, 4)
    alone = [asyncio.run(collect(engine, p, max_tokens=20, ignore_eos=True)) for p in ps]

    async def crowd():
        async def late(i, p, delay):
            await asyncio.sleep(delay)
            return await collect(engine, p, f"c{i}", max_tokens=20 + 5 * (i % 3), ignore_eos=True)

        noise = [collect(engine, list(range(10, 10 + 7 * k)), f"n{k}", max_tokens=30, ignore_eos=True,
                         temperature=1.0, seed=k) for k in range(1, 4)]
        got = await asyncio.gather(*[late(i, p, 0.002 * i) for i, p in enumerate(ps)], *noise)
        return got[: len(ps)]

    together = asyncio.run(crowd())
    for a, b in zip(alone, together):
        assert [e.token_id for e in a] == [e.token_id for e in b][: len(a)]


def test_seeded_sampling_is_reproducible(engine):
    p = prompts(engine, 1)[0]
    kw = dict(max_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    a = asyncio.run(collect(engine, p, **kw))

    async def with_mates():
        mates = [collect(engine, p, f"m{k}", max_tokens=24, temperature=1.0, seed=k, ignore_eos=True)
                 for k in range(3)]
        return (await asyncio.gather(collect(engine, p, **kw), *mates))[0]

    b = asyncio.run(with_mates())
    c = asyncio.run(collect(engine, p, **{**kw, "seed": 99}))
    assert [e.token_id for e in a] == [e.token_id for e in b]
    assert [e.token_id for e in a] != [e.token_id for e in c]


def test_stop_sequence_is_not_emitted(engine):
    p = engine.encode("Once upon a time there was")
    full = asyncio.run(collect(engine, p, max_tokens=30, ignore_eos=True))
    text = "".join(e.text for e in full)
    stop = text[10:13]
    assert stop and text.find(stop) == 10
    evs = asyncio.run(collect(engine, p, max_tokens=30, stop=[stop], ignore_eos=True))
    out = "".join(e.text for e in evs)
    assert out == text[:10]
    assert evs[-1].finish_reason == "stop"
    assert [e.token_id for e in evs] == [e.token_id for e in full][: len(evs)]


def test_prefix_ids_continue_generation(engine):
    p = prompts(engine, 1)[0]
    full = asyncio.run(collect(engine, p, max_tokens=20, ignore_eos=True))
    prefix = [e.token_id for e in full[:8]]
    req = GenerationRequest("f", p, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
                            prefix_ids=prefix)
    evs = asyncio.run(_collect_req(engine, req))
    assert [e.token_id for e in evs] == [e.token_id for e in full[8:]]
    assert "".join(e.text for e in full[:8]) + "".join(e.text for e in evs) == "".join(e.text for e in full)


def test_failover_text_concatenates_across_a_split_character(engine, tiny_dir):
    """Node A streams k tokens and dies; node B continues from prefix_ids. A held back the bytes
    of an incomplete character at its last token, so B must emit them: A's text + B's text is
    the text of one run, for every k, including ks that split a multi-byte character."""
    other = BuiltinEngine(tiny_dir, model_name="tiny", max_batch=4, max_seq_len=512)
    asyncio.run(other.start())
    try:
        p = engine.encode("The market opens")  # the tiny model emits partial UTF-8 bytes here
        full = asyncio.run(collect(engine, p, max_tokens=30, ignore_eos=True))
        ids = [e.token_id for e in full]
        splits = [k for k in range(1, 30) if engine.decode(p + ids[:k]).endswith("\ufffd")]
        assert splits, "the prompt no longer produces a split character; pick another"
        for k in sorted({1, 2, 5, 14, 20, *splits[:3]}):
            req = GenerationRequest("f", p, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True),
                                    prefix_ids=ids[:k])
            rest = asyncio.run(_collect_req(other, req))
            assert [e.token_id for e in rest] == ids[k:], k
            assert "".join(e.text for e in full[:k]) + "".join(e.text for e in rest) == \
                "".join(e.text for e in full), k
    finally:
        asyncio.run(other.close())


async def _collect_req(engine, req):
    return [ev async for ev in engine.generate(req)]


def test_score_matches_generation_logprobs(engine):
    p = prompts(engine, 1)[0]
    evs = asyncio.run(collect(engine, p, max_tokens=16, temperature=0.8, seed=5, ignore_eos=True))
    scores = asyncio.run(engine.score(p, [e.token_id for e in evs]))
    assert len(scores) == 16
    assert max(abs(s - e.logprob) for s, e in zip(scores, evs)) < 1e-3


def test_text_stream_and_chat(engine):
    text = "Héllo wörld 🙂 言語モデル"
    assert engine.decode(engine.encode(text)) == text
    chat = engine.render_chat([{"role": "user", "content": "Hi"}])
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    evs = asyncio.run(collect(engine, engine.encode(chat), max_tokens=40, ignore_eos=True))
    assert "".join(e.text for e in evs) == engine.decode([e.token_id for e in evs])


def test_cancelled_consumer_frees_its_slot(engine):
    async def run():
        agen = engine.generate(GenerationRequest("x", prompts(engine, 1)[0],
                                                 SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)))
        n = 0
        async for _ in agen:
            n += 1
            if n == 3:
                break
        await agen.aclose()
        task = asyncio.create_task(collect(engine, prompts(engine, 1)[0], max_tokens=400, ignore_eos=True))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not engine._running and not engine._waiting:
                break
            await asyncio.sleep(0.01)
        return len(engine._running) + len(engine._waiting)

    assert asyncio.run(run()) == 0


def test_errors_are_clear(engine, tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        BuiltinEngine(tmp_path)
    with pytest.raises(ModelLoadError):
        load_builtin_engine("no-such-model-or-folder")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="not supported"):
        BuiltinEngine(tmp_path)
    with pytest.raises(ModelLoadError, match="does not exist"):
        BuiltinEngine(tmp_path / "missing")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(engine.model_dir, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        BuiltinEngine(no_tok)
    with pytest.raises(RequestTooLong):
        asyncio.run(collect(engine, [5] * 600, max_tokens=4))


def test_kv_memory_budget_bounds_the_batch(tiny_dir):
    one = 2 * 4 * 2 * 32 * 4 * 256  # layers * kv heads * head dim * fp32 * positions, K and V
    assert BuiltinEngine(tiny_dir, max_seq_len=256, kv_cache_bytes=3 * one + 5).max_batch == 3
    with pytest.raises(EngineError, match="budget"):
        BuiltinEngine(tiny_dir, max_seq_len=256, kv_cache_bytes=one - 1)


def test_engine_crash_surfaces_as_engine_error(engine, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(engine.model, "decode", boom)

    async def run():
        return await asyncio.wait_for(collect(engine, prompts(engine, 1)[0], max_tokens=8), timeout=10)

    with pytest.raises(EngineError, match="simulated kernel failure"):
        asyncio.run(run())
    monkeypatch.undo()
    assert len(asyncio.run(collect(engine, prompts(engine, 1)[0], max_tokens=4, ignore_eos=True))) == 4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_bfloat16_torch_path_agrees_with_transformers(tiny_dir, device):
    """bfloat16 takes the torch attention path (the one CUDA uses): a batch of requests gives
    tokens that transformers, teacher-forced in bfloat16, ranks first, with log-probs close to
    its own (greedy sequences of the two may part at a near-tie, so they are not compared)."""
    eng = BuiltinEngine(tiny_dir, device=device, dtype="bfloat16", max_batch=4, max_seq_len=256)
    assert eng.model.kernels is None and eng.bench_key.endswith("-torch")
    asyncio.run(eng.start())
    ps = prompts(eng, 4)

    async def batch():
        return await asyncio.gather(*(collect(eng, p, f"r{i}", max_tokens=16, ignore_eos=True)
                                      for i, p in enumerate(ps)))

    try:
        results = asyncio.run(batch())
    finally:
        asyncio.run(eng.close())
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.bfloat16).to(device).eval()
    for p, evs in zip(ps, results):
        toks = torch.tensor([e.token_id for e in evs])
        with torch.inference_mode():
            logits = model(torch.tensor([p + toks.tolist()], device=device)).logits[0].float().cpu()
        lp = torch.log_softmax(logits, -1)[len(p) - 1 : -1]
        assert len(evs) == 16
        assert float((lp.argmax(-1) == toks).float().mean()) >= 0.8
        assert float((lp.gather(1, toks[:, None])[:, 0] - torch.tensor([e.logprob for e in evs])).abs().mean()) < 0.1
