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
    j["ref"][-1] = -11.0
    j["claimed"][-1] = -11.0
    v = _verify(j, max_tokens=32, finish_reason="stop", eos_ids=[0, 2])
    assert "premature_stop" in v.reasons
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
def test_bench_verify_runs_end_to_end(capsys):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import verify as bench  # noqa: PLC0415

    import torch

    threads = torch.get_num_threads()
    try:
        out = bench.main(["--quick", "--honest-jobs", "16", "--adv-jobs", "6"])
    finally:
        torch.set_num_threads(threads)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["detection_rate_min"] == out["detection_rate_min"] == 1.0
    assert last["false_positive_rate"] == 0.0 and last["verify_cost_fraction"] <= 0.05
