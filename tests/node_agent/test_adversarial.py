"""TEST TOOL modes: each cheat runs through a real engine and verification catches it;
honest engines in other dtypes and batch sizes pass."""

from __future__ import annotations

import asyncio
import hashlib

import numpy as np
import pytest
import torch

from node_agent.adversarial import (
    AGENT_MODES, DETECTION_TARGETS, ENGINE_MODES, make_adversarial_engine, quantize_groupwise,
)
from node_agent.engines.base import GenerationRequest, SamplingParams
from node_agent.engines.builtin import load_builtin_engine
from node_agent.engines.builtin.model import LlamaModel
from node_agent.rescoring import rescore_with_model
from node_agent.tiny_model import resolve_model
from scheduler.verification import verify_rescored

SAMPLINGS = [dict(temperature=0.0), dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, top_k=40)]


@pytest.fixture(scope="module")
def reference():
    return LlamaModel(resolve_model("tiny"))


def _jobs(engine, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    corpus = engine.encode("The market opens before sunrise. Sellers bring their machines, buyers bring questions.")

    async def main():
        await engine.start()
        try:
            async def one(i):
                sp = SamplingParams(max_tokens=24, seed=i, **SAMPLINGS[i % len(SAMPLINGS)])
                prompt = corpus[: int(rng.integers(6, len(corpus)))]
                evs = [ev async for ev in engine.generate(GenerationRequest(f"r{i}", prompt, sp))]
                return prompt, sp, evs

            return await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            await engine.close()

    return asyncio.run(main())


def _verdicts(jobs, reference, node_dtype="bfloat16"):
    out = []
    for prompt, sp, evs in jobs:
        ids = [e.token_id for e in evs]
        lps = [round(e.logprob * 1e4) / 1e4 for e in evs]
        r = rescore_with_model(reference, prompt, ids, sp)
        out.append(verify_rescored(ids, lps, r, sp, node_dtype=node_dtype, verifier_dtype="float32", model="tiny",
                                   finish_reason=evs[-1].finish_reason if evs else None, eos_ids=[0, 2]))
    return out


def test_groupwise_quantisation_error_shrinks_with_bits():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    e4 = (quantize_groupwise(w, 4) - w).abs().mean()
    e8 = (quantize_groupwise(w, 8) - w).abs().mean()
    assert e8 < e4 / 8 and e4 < 0.2 * w.abs().mean()
    assert len(torch.unique(quantize_groupwise(w, 4)[0, :64])) <= 16


@pytest.mark.parametrize("dtype,batch", [("float32", 8), ("bfloat16", 8), ("float16", 1)])
def test_honest_engines_pass(reference, dtype, batch):
    verdicts = _verdicts(_jobs(load_builtin_engine("tiny", dtype=dtype, max_batch=batch), 6), reference, dtype)
    assert all(v.passed for v in verdicts), [v.reasons for v in verdicts]


@pytest.mark.parametrize("mode", DETECTION_TARGETS)
def test_each_adversarial_mode_is_caught(reference, mode):
    weights = resolve_model("tiny") / "model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    eng = make_adversarial_engine(mode, "tiny", max_batch=8, seed=1)
    assert eng.model_name == "tiny"  # it claims the real model
    verdicts = _verdicts(_jobs(eng, 6, seed=1), reference)  # and the loosest honest dtype
    assert all(not v.passed for v in verdicts), [(v.reasons, v.mean_abs_delta) for v in verdicts]
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before  # private copy only


def test_noisy_weights_fail_single_audits_when_declared_float32(reference):
    """1% weight noise hides in bf16's rounding for one audit (the evidence across audits
    catches it: bench/verify.py, noise_as_bf16_jobs_to_detect), but not behind float32's."""
    verdicts = _verdicts(_jobs(make_adversarial_engine("noise", "tiny", max_batch=8, seed=3), 6, seed=2), reference,
                         node_dtype="float32")
    assert all(not v.passed for v in verdicts), [(v.reasons, v.mean_abs_delta) for v in verdicts]


def test_int8_is_close_to_honest_and_modes_are_listed(reference):
    verdicts = _verdicts(_jobs(make_adversarial_engine("int8", "tiny", max_batch=8), 6), reference)
    assert np.mean([v.mean_abs_delta for v in verdicts]) < 0.3  # near bf16 noise: a measurement, not a target
    assert set(DETECTION_TARGETS) | {"int8", "noise", "cheat_then_stall"} == set(ENGINE_MODES)
    assert {"inflate_tokens", "replay_receipt", "overclaim_tps"} <= set(AGENT_MODES)
    with pytest.raises(ValueError):
        make_adversarial_engine("nonsense", "tiny")
