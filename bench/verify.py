"""Verification benchmark: cost, detection per adversarial mode, honest false positives.

    python bench/verify.py --quick        # under a minute on 2 CPU cores
    python bench/verify.py                # more jobs, all tiny presets for the cost figures

Every job is a real request through a real engine (continuous batching): honest built-in
engines in float32 / bfloat16 / float16 at batch limits 1, 8 and 32, and the adversarial
engines of `node_agent.adversarial` (TEST TOOL). Each job is rescored teacher-forced by a
verifier (`node_agent.rescoring`, float32, and bfloat16 for a share of honest jobs) and
judged by `scheduler.verification.verify_rescored`. Requests mix greedy, temperature +
top-p and temperature + top-k sampling, with prompts of 8-48 tokens and 32 output tokens.

Cost: per preset, the verifier's one forward pass over prompt + output against the node's
generation of the same job (prefill + decode at batch 1), in wall time (warmed up) and in
FLOPs; `verify_cost_fraction` is the wall-time share for the largest preset measured, times
the long-run audit rate of `scheduler.audit`. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from node_agent.adversarial import DETECTION_TARGETS, make_adversarial_engine  # noqa: E402
from node_agent.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from node_agent.engines.builtin import load_builtin_engine  # noqa: E402
from node_agent.engines.builtin.model import LlamaModel  # noqa: E402
from node_agent.rescoring import rescore_with_model  # noqa: E402
from node_agent.tiny_model import _CORPUS, resolve_model  # noqa: E402
from scipy.stats import beta  # noqa: E402

from scheduler.audit import AuditPolicy, cheating_economics  # noqa: E402
from scheduler.verification import jobs_to_detect, jobs_to_tell, verify_rescored  # noqa: E402

SAMPLINGS = [
    dict(temperature=0.0),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=0.7, top_k=40),
    dict(temperature=1.0),
]


def make_specs(engine, n: int, seed: int, max_tokens: int = 32) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    corpus = engine.encode(_CORPUS)
    specs = []
    for i in range(n):
        plen = rng.randint(8, 48)
        start = rng.randrange(0, len(corpus) - plen)
        prompt = corpus[start:start + plen] if rng.random() < 0.7 else [rng.randrange(3, 512) for _ in range(plen)]
        s = dict(SAMPLINGS[i % len(SAMPLINGS)])
        specs.append((prompt, SamplingParams(max_tokens=max_tokens, seed=rng.randrange(1 << 30), **s)))
    return specs


async def run_jobs(engine, specs) -> list[dict]:
    async def one(i, prompt, sp):
        ids, lps, finish = [], [], None
        async for ev in engine.generate(GenerationRequest(f"j{i}", prompt, sp)):
            ids.append(ev.token_id)
            lps.append(round(ev.logprob * 1e4) / 1e4)  # as committed on the wire
            finish = ev.finish_reason or finish
        return dict(prompt=prompt, sampling=sp, ids=ids, lps=lps, finish=finish)

    return await asyncio.gather(*(one(i, p, s) for i, (p, s) in enumerate(specs)))


def generate(engine, specs) -> tuple[list[dict], float]:
    async def main():
        await engine.start()
        try:
            t = time.perf_counter()
            jobs = await run_jobs(engine, specs)
            return jobs, time.perf_counter() - t
        finally:
            await engine.close()

    return asyncio.run(main())


def judge(jobs, verifier: LlamaModel, node_dtype: str, verifier_dtype: str, eos_ids, model: str) -> list:
    out = []
    for j in jobs:
        sp = j["sampling"]
        r = rescore_with_model(verifier, j["prompt"], j["ids"], sp)
        out.append(verify_rescored(j["ids"], j["lps"], r, sp, node_dtype=node_dtype, verifier_dtype=verifier_dtype,
                                   finish_reason=j["finish"], eos_ids=eos_ids, has_stop_strings=bool(sp.stop), model=model))
    return out


def cost(preset: str, reps: int) -> dict:
    """Verifier forward over prompt+output vs the node's batch-1 generation of that job."""
    eng = load_builtin_engine(preset, max_batch=1)
    prompt_len, out_len = 32, 32
    prompt = [random.Random(1).randrange(3, 512) for _ in range(prompt_len)]
    sp = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)

    async def main():
        await eng.start()
        try:
            best_gen, ids = math.inf, []
            for _ in range(reps + 1):
                t = time.perf_counter()
                ids = [ev.token_id async for ev in eng.generate(GenerationRequest("c", prompt, sp))]
                best_gen = min(best_gen, time.perf_counter() - t)
            best_ver = math.inf
            for _ in range(reps + 1):
                t = time.perf_counter()
                await eng.call(lambda: rescore_with_model(eng.model, prompt, ids, sp))
                best_ver = min(best_ver, time.perf_counter() - t)
            return best_gen, best_ver
        finally:
            await eng.close()

    gen_s, ver_s = asyncio.run(main())
    n = eng.model.num_params()
    c = eng.model.cfg
    # Attention FLOPs are small at these lengths but counted: 4 * layers * hidden * context per token.
    attn = lambda ctx: 4 * c.num_layers * c.num_heads * c.head_dim * ctx  # noqa: E731
    gen_flops = sum(2 * n + attn(i + 1) for i in range(prompt_len + out_len))
    decode_flops = sum(2 * n + attn(prompt_len + i + 1) for i in range(out_len))
    ver_flops = gen_flops  # one prefill over the same prompt + output
    return dict(preset=preset, params=n, gen_s=gen_s, verify_s=ver_s, wall_fraction=ver_s / gen_s,
                flops_fraction_of_job=ver_flops / gen_flops, flops_fraction_of_decode=ver_flops / decode_flops)


def _finite(x):
    """JSON has no Infinity: an unbounded figure (never detected) becomes null."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--honest-jobs", type=int, default=None, help="honest jobs per (dtype, batch) cell")
    ap.add_argument("--adv-jobs", type=int, default=None, help="jobs per adversarial mode")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared box)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    quick = args.quick
    cells = [("float32", 32), ("bfloat16", 32), ("float16", 32), ("bfloat16", 8), ("float32", 8), ("bfloat16", 1)]
    per_cell = args.honest_jobs or (220 if quick else 800)
    n_adv = args.adv_jobs or (40 if quick else 200)
    model = args.model
    folder = resolve_model(model)
    verifiers = {"float32": LlamaModel(folder, dtype=torch.float32), "bfloat16": LlamaModel(folder, dtype=torch.bfloat16)}
    probe = load_builtin_engine(model, max_batch=1)
    eos = sorted(probe.eos_ids)

    honest: dict[str, list] = {}
    stat_pool: dict[str, list[float]] = {}
    for ci, (dtype, batch) in enumerate(cells):
        n = per_cell if batch > 1 else max(per_cell // 8, 12)
        jobs, _ = generate(load_builtin_engine(model, dtype=dtype, max_batch=batch), make_specs(probe, n, 100 + ci))
        for vd in ("float32", "bfloat16") if ci % 2 == 0 else ("float32",):
            verdicts = judge(jobs, verifiers[vd], dtype, vd, eos, model)
            honest[f"{dtype}/b{batch}/v{vd}"] = verdicts
            if vd == "float32" and dtype == "bfloat16":
                stat_pool.setdefault("bf16", []).extend(v.mean_abs_delta for v in verdicts)
    n_honest = sum(len(v) for v in honest.values())
    n_fp = sum(not v.passed for vs in honest.values() for v in vs)
    fp_reasons: dict[str, int] = {}
    for vs in honest.values():
        for v in vs:
            for r in v.reasons:
                fp_reasons[r] = fp_reasons.get(r, 0) + 1

    modes = {}
    for mi, mode in enumerate(DETECTION_TARGETS + ("int8",)):
        eng = make_adversarial_engine(mode, model, max_batch=32, seed=mi)
        jobs, _ = generate(eng, make_specs(probe, n_adv, 500 + mi))
        # A cheater claims the loosest honest dtype (bfloat16) to get the widest tolerance.
        verdicts = judge(jobs, verifiers["float32"], "bfloat16", "float32", eos, model)
        rate = float(np.mean([not v.passed for v in verdicts]))
        reasons: dict[str, int] = {}
        for v in verdicts:
            for r in v.reasons:
                reasons[r] = reasons.get(r, 0) + 1
        modes[mode] = dict(detection_rate=rate, jobs_to_detect=jobs_to_detect(rate), reasons=reasons,
                           mean_abs_delta=float(np.mean([v.mean_abs_delta for v in verdicts])),
                           loglik_deficit=float(np.mean([v.loglik_deficit for v in verdicts])))
        if mode == "int8":
            modes[mode]["jobs_to_tell_vs_bf16"] = jobs_to_tell(stat_pool["bf16"], [v.mean_abs_delta for v in verdicts])
        print(f"{mode:18s} detected {rate:6.1%}  jobs-to-detect {modes[mode]['jobs_to_detect']}  {reasons}",
              file=sys.stderr)

    presets = ["tiny", "tiny-20m"] if quick else ["tiny", "tiny-20m", "tiny-100m"]
    costs = [cost(p, 2 if quick else 5) for p in presets]
    for c in costs:
        print(f"{c['preset']:10s} verify/generate wall {c['wall_fraction']:.3f}  flops {c['flops_fraction_of_job']:.2f}"
              f" of job, {c['flops_fraction_of_decode']:.2f} of decode", file=sys.stderr)
    rate = AuditPolicy().long_run_rate
    # Economics at the long-run rate: $2 per million output tokens, 256-token jobs, $100 stake.
    econ = cheating_economics(price_out=2_000_000_000, tokens_per_job=256, stake=100_000_000_000, audit_rate=rate,
                              detection_prob=min(m["detection_rate"] for k, m in modes.items() if k != "int8"))
    distinct = sum(len(v) for k, v in honest.items() if k.endswith("/vfloat32"))
    targets = [m for m in modes if m != "int8"]
    result = dict(
        model=model, quick=quick,
        detection_rate_min=min(modes[m]["detection_rate"] for m in targets),
        jobs_to_detect_max=max(modes[m]["jobs_to_detect"] for m in targets),
        false_positive_rate=n_fp / n_honest, honest_jobs_audited=n_honest, honest_distinct_jobs=distinct,
        # One-sided 95% upper bound on the false-positive rate (exact binomial).
        false_positive_rate_upper95=float(beta.ppf(0.95, n_fp + 1, n_honest - n_fp)),
        false_positive_reasons=fp_reasons,
        adversarial_jobs_per_mode=n_adv,
        int8_jobs_to_tell_vs_bf16=modes["int8"]["jobs_to_tell_vs_bf16"],
        int8_detection_rate=modes["int8"]["detection_rate"],
        verify_wall_fraction_per_audit=costs[-1]["wall_fraction"],
        verify_flops_fraction_per_audit=costs[-1]["flops_fraction_of_job"],
        default_audit_rate=rate,
        verify_cost_fraction=costs[-1]["wall_fraction"] * rate,
        verify_flops_fraction=costs[-1]["flops_fraction_of_job"] * rate,
        modes={m: {k: v for k, v in d.items() if k != "reasons"} for m, d in modes.items()},
        honest_cells={k: dict(jobs=len(v), failed=sum(not x.passed for x in v),
                              mean_abs_delta_p99=float(np.quantile([x.mean_abs_delta for x in v], 0.99)))
                      for k, v in honest.items()},
        cost=costs,
        economics=dict(gain_per_job=econ.gain_per_job, expected_penalty_per_job=econ.expected_penalty_per_job,
                       ratio=econ.ratio, deterrent=econ.deterrent, min_slash=econ.min_slash,
                       min_audit_rate=econ.min_audit_rate),
        seconds=round(time.perf_counter() - t0, 1),
    )
    print(json.dumps(_finite(result)))
    return result


if __name__ == "__main__":
    main()
