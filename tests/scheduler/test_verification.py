"""The per-job check on plain arrays: honest-looking jobs pass, each kind of lie fails."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scheduler.verification import (
    TOLERANCES, jobs_to_detect, jobs_to_tell, tolerance_for, verify_job, verify_rescored,
)


def _job(rng, n=32, greedy=False, noise=0.0):
    """Synthetic reference: peaked distributions; honest claimed tokens drawn from them."""
    logits = rng.normal(0, 3.5, (n, 64))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    p = np.exp(logp)
    ids = logp.argmax(-1) if greedy else np.array([rng.choice(64, p=row) for row in p])
    ref = logp[np.arange(n), ids]
    exp = logp.max(-1) if greedy else (p * logp).sum(-1)
    var = np.zeros(n) if greedy else (p * (logp - exp[:, None]) ** 2).sum(-1)
    claimed = ref + rng.normal(0, noise, n)
    return dict(ids=ids, claimed=np.minimum(claimed, 0), ref=ref, top1_ids=logp.argmax(-1), top1=logp.max(-1),
                adm=np.ones(n, bool), exp=exp, var=var, logp=logp)


def _verify(j, temperature=1.0, model="tiny", **kw):
    return verify_job(j["ids"], j["claimed"], j["ref"], j["top1_ids"], j["top1"], j["adm"], temperature=temperature,
                      expected_logprobs=j["exp"], var_logprobs=j["var"], model=model, **kw)


def test_honest_sampled_and_greedy_pass_across_dtypes():
    rng = np.random.default_rng(0)
    for dtype, noise in (("float32", 0.0), ("float16", 0.02), ("bfloat16", 0.12)):
        for greedy in (False, True):
            for _ in range(50):
                j = _job(rng, greedy=greedy, noise=noise)
                v = _verify(j, temperature=0.0 if greedy else 1.0, node_dtype=dtype, max_tokens=32,
                            finish_reason="length")
                assert v.passed, (dtype, greedy, v)


def test_claimed_logprobs_from_another_model_fail():
    rng = np.random.default_rng(1)
    j = _job(rng)
    j["claimed"] = np.minimum(j["ref"] + rng.normal(0, 2.0, 32), 0)
    v = _verify(j, node_dtype="bfloat16")
    assert not v.passed and "logprob_mismatch" in v.reasons


def test_random_tokens_fail_even_with_exact_reference_logprobs():
    rng = np.random.default_rng(2)
    j = _job(rng)
    j["ids"] = rng.integers(0, 64, 32)
    j["ref"] = j["logp"][np.arange(32), j["ids"]]
    j["claimed"] = j["ref"].copy()  # the forger knows the reference's log-probs
    v = _verify(j, node_dtype="bfloat16")
    assert v.mean_abs_delta == 0.0
    assert not v.passed and "unlikely_tokens" in v.reasons
    # Greedy: the same tokens are not the argmax either.
    g = _verify(j, temperature=0.0, node_dtype="bfloat16")
    assert not g.passed and {"not_greedy", "unlikely_tokens"} <= set(g.reasons)


def test_sampled_tokens_outside_the_nucleus_fail():
    rng = np.random.default_rng(3)
    j = _job(rng)
    j["adm"][:8] = False
    v = _verify(j, temperature=0.7, top_p=0.9)
    assert not v.passed and "inadmissible_tokens" in v.reasons
    j["adm"][:] = True
    j["adm"][0] = False  # one borderline token is rounding noise, not a lie
    assert _verify(j, temperature=0.7, top_p=0.9).passed


def test_structure_checks():
    rng = np.random.default_rng(4)
    j = _job(rng, n=16)
    assert "length_finish_short" in _verify(j, max_tokens=32, finish_reason="length").reasons
    assert "stop_without_eos" in _verify(j, max_tokens=32, finish_reason="stop").reasons
    assert _verify(j, max_tokens=32, finish_reason="stop", has_stop_strings=True).passed
    assert "token_count_mismatch" in _verify(j, receipt_tokens=24).reasons
    assert "too_many_tokens" in _verify(j, max_tokens=8).reasons
    # A claimed end-of-sequence token the reference finds implausible is a premature stop.
    j["ids"][-1] = 2
    j["ref"][-1] = -15.0
    j["claimed"][-1] = -15.0
    v = _verify(j, max_tokens=32, finish_reason="stop", eos_ids=[0, 2])
    assert "premature_stop" in v.reasons
    # ... but an honest sampler does draw an end token of probability e^-11 now and then: for a
    # 16-token answer the floor is log(1e-4 / 16) ≈ -12, so at most 1 honest job in 10,000 is
    # flagged by this check (a fixed -9 flagged about 1 in 600 in the embedded demo)
    j["ref"][-1] = j["claimed"][-1] = -11.0
    assert "premature_stop" not in _verify(j, max_tokens=32, finish_reason="stop", eos_ids=[0, 2]).reasons
    j["ref"][-1] = j["claimed"][-1] = -1.0
    assert "premature_stop" not in _verify(j, max_tokens=32, finish_reason="stop", eos_ids=[0, 2]).reasons
    bad = verify_job([1, 2], [-1.0], [-1.0, -1.0], [1, 2], [-1.0, -1.0], [True, True], temperature=1.0)
    assert not bad.passed and bad.reasons == ["length_mismatch"]
    assert verify_job([], [], [], [], [], [], temperature=1.0).passed
    assert "invalid_logprobs" in verify_job([1], [0.5], [-0.1], [1], [-0.1], [True], temperature=0).reasons


def test_tolerances_add_per_side_and_unknown_dtype_is_loosest():
    t = tolerance_for("bfloat16", "float32")
    assert t.mean_abs_delta == pytest.approx(TOLERANCES["bfloat16"].mean_abs_delta + TOLERANCES["float32"].mean_abs_delta)
    assert tolerance_for(None, "float32") == tolerance_for("bfloat16", "float32")
    assert tolerance_for("float32", "float32").mean_abs_delta < t.mean_abs_delta


def test_short_jobs_get_a_wider_delta_allowance():
    v1 = verify_job([5], [-1.0], [-1.3], [5], [-1.0], [True], temperature=1.0, node_dtype="bfloat16", model="tiny")
    assert v1.passed  # |Δ| 0.3 on one token is within bf16 noise
    v32 = verify_job([5] * 32, [-1.0] * 32, [-1.3] * 32, [5] * 32, [-1.0] * 32, [True] * 32, temperature=1.0, model="tiny",
                     node_dtype="bfloat16")
    assert not v32.passed  # the same |Δ| on every token of a full job is not


def test_verify_rescored_takes_a_rescore_object_and_sampling_dict():
    rng = np.random.default_rng(5)
    j = _job(rng)

    class R:
        logprob, top1_id, top1_logprob, admissible = j["ref"], j["top1_ids"], j["top1"], j["adm"]
        expected_logprob, var_logprob = j["exp"], j["var"]

    v = verify_rescored(j["ids"], j["claimed"], R, {"temperature": 1.0, "max_tokens": 32}, finish_reason="length")
    assert v.passed and v.as_dict()["n_tokens"] == 32
    wire = {k: getattr(R, k).tolist() for k in ("logprob", "top1_id", "top1_logprob", "admissible",
                                                 "expected_logprob", "var_logprob")}
    assert verify_rescored(j["ids"], j["claimed"], wire, {"temperature": 1.0}, model="tiny").passed


def test_jobs_to_detect_and_to_tell():
    assert jobs_to_detect(1.0) == 1
    assert jobs_to_detect(0.5) == 7  # 1 - 0.5**7 >= 0.99
    assert math.isinf(jobs_to_detect(0.0))
    rng = np.random.default_rng(6)
    honest, cheat = rng.normal(0.08, 0.03, 500), rng.normal(0.11, 0.04, 500)
    k = jobs_to_tell(honest, cheat)
    assert 25 <= k <= 60  # ((3.09 * 0.03 + 2.33 * 0.04) / 0.03) ** 2 ~ 38
    assert math.isinf(jobs_to_tell(cheat, honest))


@pytest.mark.slow
def test_bench_verify_runs_end_to_end(capsys, monkeypatch, tmp_path):
    import json
    import sys
    from pathlib import Path

    monkeypatch.setenv("AGORA_BENCH_RESULTS", str(tmp_path))  # not over the developer's bench/results/verify.json
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import verify as bench  # noqa: PLC0415

    import torch

    threads = torch.get_num_threads()
    try:
        out = bench.main(["--quick", "--honest-jobs", "16", "--adv-jobs", "6", "--no-cross-engine"])
    finally:
        torch.set_num_threads(threads)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["detection_rate_min"] == out["detection_rate_min"] == 1.0
    assert last["false_positive_rate"] == 0.0 and last["verify_cost_fraction"] <= 0.05
    # The cross-engine section says why it did not run, its figures null (never made up).
    assert last["cross_engine_false_positive_rate"] is None and last["cross_engine_audits"] == 0
    assert "--no-cross-engine" in last["cross_engine"]["skipped"]
    assert last["int8_declared_false_positive_rate"] == 0.0 and last["int8_declared_audits"] > 0
    assert json.loads((tmp_path / "verify.json").read_text())["figures"] == last  # what bench/compare.py reads


# ---------------------------------------------------------------- calibrated tolerances on real engines
def test_int8_allowance_applies_only_when_int8_is_declared():
    from scheduler.verification import QUANT_TOLERANCES

    plain = tolerance_for("bfloat16", "float32")
    q = QUANT_TOLERANCES["int8"]
    assert tolerance_for("bfloat16", "float32", node_quantization="int8").mean_abs_delta == pytest.approx(
        plain.mean_abs_delta + q.mean_abs_delta)
    assert tolerance_for("bfloat16", "float32", node_quantization="INT8") == tolerance_for(
        "bfloat16", "float32", node_quantization="int8")
    # Uncalibrated quantisations get nothing extra (another model, audited by its own weights).
    assert tolerance_for("bfloat16", "float32", node_quantization="awq") == plain
    assert tolerance_for("bfloat16", "float32", node_quantization=None) == plain


_SAMPLINGS = ({"temperature": 0.0}, {"temperature": 1.0, "top_p": 0.9}, {"temperature": 0.7, "top_k": 40},
              {"temperature": 1.0})


def _engine_jobs(engine, n: int = 12, seed: int = 0) -> list[dict]:
    """n honest-as-served jobs of 32 tokens from a started-here engine, mixed samplings."""
    import asyncio
    import random

    from node_agent.engines.base import GenerationRequest, SamplingParams
    from node_agent.tiny_model import _CORPUS

    rng = random.Random(seed)
    corpus = engine.encode(_CORPUS)
    specs = []
    for i in range(n):
        plen = rng.randint(8, 40)
        start = rng.randrange(0, len(corpus) - plen)
        specs.append((corpus[start:start + plen],
                      SamplingParams(max_tokens=32, seed=rng.randrange(1 << 30), **_SAMPLINGS[i % len(_SAMPLINGS)])))

    async def main():
        await engine.start()
        try:
            async def one(i, prompt, sp):
                evs = [ev async for ev in engine.generate(GenerationRequest(f"t{i}", prompt, sp))]
                return dict(prompt=prompt, sampling=sp, ids=[e.token_id for e in evs],
                            lps=[round(e.logprob * 1e4) / 1e4 for e in evs], finish=evs[-1].finish_reason)
            return await asyncio.gather(*(one(i, p, s) for i, (p, s) in enumerate(specs)))
        finally:
            await engine.close()

    return asyncio.run(main())


def _topk_rescore(model, job, k: int = 20):
    """What a vLLM verifier computes: only the top-k log-probs (plus the claimed token's)."""
    import torch

    from node_agent.rescoring import rescore_topk

    prompt, ids = job["prompt"], job["ids"]
    logp = torch.log_softmax(model.forward_full(prompt + ids)[len(prompt) - 1:-1].float(), -1)
    top = []
    for i, cid in enumerate(ids):
        vals, idx = torch.topk(logp[i], k)
        d = {int(t): float(v) for t, v in zip(idx, vals)}
        d[int(cid)] = float(logp[i, cid])
        top.append(d)
    return rescore_topk(ids, top, job["sampling"], model.cfg.vocab_size)


def _judge(jobs, rescore, node_dtype, verifier_dtype, node_quantization=None):
    return [verify_rescored(j["ids"], j["lps"], rescore(j), j["sampling"], model="tiny", node_dtype=node_dtype,
                            verifier_dtype=verifier_dtype, node_quantization=node_quantization,
                            finish_reason=j["finish"], eos_ids=(0, 2), receipt_tokens=len(j["ids"]))
            for j in jobs]


@pytest.fixture(scope="module")
def verifiers():
    import torch

    from node_agent.engines.builtin.model import LlamaModel
    from node_agent.tiny_model import resolve_model

    folder = resolve_model("tiny")
    return {"float32": LlamaModel(folder, dtype=torch.float32), "bfloat16": LlamaModel(folder, dtype=torch.bfloat16)}


def test_honest_cross_dtype_evidence_passes_full_and_top_k_rescoring(verifiers):
    from node_agent.engines.builtin import load_builtin_engine
    from node_agent.rescoring import rescore_with_model

    for node_dtype, seed in (("bfloat16", 1), ("float32", 2)):
        jobs = _engine_jobs(load_builtin_engine("tiny", dtype=node_dtype, max_batch=8), seed=seed)
        for vd, model in verifiers.items():
            full = _judge(jobs, lambda j, m=model: rescore_with_model(m, j["prompt"], j["ids"], j["sampling"]),
                          node_dtype, vd)
            topk = _judge(jobs, lambda j, m=model: _topk_rescore(m, j), node_dtype, vd)
            for v in full + topk:
                assert v.passed, (node_dtype, vd, v.reasons, v.as_dict())


def test_declared_int8_passes_while_int4_and_another_model_fail(verifiers):
    from node_agent.adversarial import make_adversarial_engine
    from node_agent.rescoring import rescore_with_model

    ref = verifiers["float32"]
    full = lambda j: rescore_with_model(ref, j["prompt"], j["ids"], j["sampling"])
    int8 = _engine_jobs(make_adversarial_engine("int8", "tiny", max_batch=8), seed=3)
    assert all(v.passed for v in _judge(int8, full, "float32", "float32", node_quantization="int8"))
    int4 = _engine_jobs(make_adversarial_engine("int4", "tiny", max_batch=8), seed=4)
    # int4 weights get no pass by declaring int8 on top of the loosest dtype, nor as int4.
    for q in ("int8", "int4"):
        verdicts = _judge(int4, full, "bfloat16", "float32", node_quantization=q)
        assert sum(not v.passed for v in verdicts) >= len(verdicts) - 1, [v.reasons for v in verdicts]
    other = _engine_jobs(make_adversarial_engine("other_model", "tiny", max_batch=8), seed=5)
    for v in _judge(other, lambda j: _topk_rescore(ref, j), "bfloat16", "float32", node_quantization="int8"):
        assert not v.passed and {"logprob_mismatch", "unlikely_tokens"} & set(v.reasons)
