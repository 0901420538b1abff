"""An honest benchmark of one engine on this machine: prefill and decode tok/s per batch size,
time to first token, and the decode memory roofline.

Rules (DESIGN.md): warm up first, synchronise the device around timers, count generated
tokens only. Each batch size runs B concurrent greedy requests of `prompt_len` random prompt
tokens and `gen_len` generated tokens (EOS ignored) through the engine's public
`generate()`, so what is measured is what a buyer gets, including the engine's own
scheduling. Decode tok/s is (generated tokens - B) / (last token time - last first-token
time); prefill tok/s is B * prompt_len / (last first-token time).

Roofline: a decode step at batch 1 must read every weight (and the KV cache) once, so
tok/s at batch 1 can be at most memory bandwidth / bytes per step. Bandwidth is measured
with a large tensor copy; the fraction reached is reported for engines that expose their
weights (the built-in engine).

Results are cached as JSON per (model, device, dtype, settings) under the cache dir; the
node agent runs `run_benchmark(engine, quick=True)` at each start and sends `summary`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import sys
import threading
import time
from pathlib import Path

from node_agent.engines.base import Engine, GenerationRequest, SamplingParams

DEFAULT_BATCHES = (1, 2, 4, 8, 16, 32)
QUICK = dict(batch_sizes=(1, 8), prompt_len=32, gen_len=24)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def measure_bandwidth(device: str = "cpu", nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Memory bandwidth in bytes/s, from a tensor far larger than the caches: the best of
    `repeats` copies (bytes read + written) and `repeats` full reads (a sum), whichever is
    higher. Taking the best makes the roofline fraction conservative on a shared machine."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best_copy = best_read = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best_copy = min(best_copy, time.perf_counter() - t)
        t = time.perf_counter()
        src.sum()
        _sync(device)
        best_read = min(best_read, time.perf_counter() - t)
    return max(2 * nbytes / best_copy, nbytes / best_read)


def default_cache_dir() -> Path:
    home = os.environ.get("AGORA_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "agora") / "bench"


def _engine_id(engine: Engine) -> tuple[str, str, str]:
    """(model, device, dtype) for the cache key; the device part also names the engine's
    implementation where it has one (`bench_key`), so a faster build re-measures."""
    device = str(getattr(engine, "device", "remote"))
    impl = getattr(engine, "bench_key", None)
    return (
        getattr(engine, "model_name", "model"),
        f"{device}-{impl}" if impl else device,
        str(getattr(engine, "dtype", "unknown")),
    )


async def _round(engine: Engine, batch: int, prompt_len: int, gen_len: int, vocab: int, seed: int, device: str):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(batch)]
    firsts: list[float] = []
    counts: list[int] = []

    async def one(i: int) -> None:
        req = GenerationRequest(
            f"bench-{seed}-{i}", prompts[i],
            SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True),
        )
        n = 0
        async for _ in engine.generate(req):
            if n == 0:
                firsts.append(time.perf_counter())
            n += 1
        counts.append(n)

    _sync(device)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(batch)))
    _sync(device)
    t_end = time.perf_counter()
    last_first = max(firsts)
    decoded = sum(counts) - batch
    return {
        "batch": batch,
        "prefill_tok_s": batch * prompt_len / (last_first - t0),
        "decode_tok_s": decoded / (t_end - last_first) if decoded and t_end > last_first else 0.0,
        "ttft_ms": 1e3 * (sum(firsts) / len(firsts) - t0),
        "generated_tokens": sum(counts),
        "seconds": t_end - t0,
    }


async def arun_benchmark(
    engine: Engine,
    batch_sizes: tuple[int, ...] = DEFAULT_BATCHES,
    prompt_len: int = 128,
    gen_len: int = 64,
    progress: bool = True,
    quick: bool = False,
    repeats: int | None = None,
    cache_dir: str | Path | None = None,
    refresh: bool = False,
) -> dict:
    """See the module docstring; the async form of `run_benchmark`."""
    from tqdm import tqdm

    if quick:
        batch_sizes, prompt_len, gen_len = QUICK["batch_sizes"], QUICK["prompt_len"], QUICK["gen_len"]
    repeats = repeats or (1 if quick else 2)
    model, device_key, dtype = _engine_id(engine)
    device = str(getattr(engine, "device", "remote"))
    tag = f"{model}__{device_key}__{dtype}__b{'-'.join(map(str, batch_sizes))}_p{prompt_len}_g{gen_len}_r{repeats}"
    path = Path(cache_dir or default_cache_dir()) / (re.sub(r"[^A-Za-z0-9_.@=-]+", "_", tag) + ".json")
    if not refresh and path.exists():
        try:
            cached = json.loads(path.read_text())
            cached["cached"] = True
            return cached
        except ValueError:
            pass

    inner = getattr(engine, "model", None)
    cfg = getattr(inner, "cfg", None)
    vocab = cfg.vocab_size if cfg is not None else 256
    rows = []
    bar = tqdm(total=len(batch_sizes), desc=f"benchmark {model}", file=sys.stderr, disable=not progress)
    try:
        await _round(engine, 1, min(prompt_len, 16), 4, vocab, seed=-1, device=device)  # warm-up
        for b in batch_sizes:
            await _round(engine, b, prompt_len, 4, vocab, seed=-b, device=device)  # warm-up at this batch
            best = None
            for r in range(repeats):
                row = await _round(engine, b, prompt_len, gen_len, vocab, seed=1000 * b + r, device=device)
                if best is None or row["decode_tok_s"] > best["decode_tok_s"]:
                    best = row
            rows.append(best)
            bar.set_postfix(batch=b, decode_tok_s=round(best["decode_tok_s"], 1))
            bar.update(1)
    finally:
        bar.close()

    result: dict = {
        "model": model, "device": device, "dtype": dtype, "quick": quick,
        "engine": getattr(engine, "bench_key", None) or type(engine).__name__,
        "prompt_len": prompt_len, "gen_len": gen_len, "batches": rows,
        "measured_at": time.time(), "cached": False,
    }
    b1 = next((r for r in rows if r["batch"] == 1), None)
    if inner is not None and hasattr(inner, "weight_bytes") and device != "remote":
        bw = measure_bandwidth(device, nbytes=(256 << 20) if quick else (512 << 20), repeats=5)
        kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * inner.embed.element_size()
        step_bytes = inner.weight_bytes() + kv_per_token * (prompt_len + gen_len // 2)
        result["memory_bandwidth_gb_s"] = bw / 1e9
        result["roofline"] = {
            "weight_bytes": inner.weight_bytes(),
            "bytes_per_step_b1": step_bytes,
            "max_tok_s_b1": bw / step_bytes,
            "achieved_gb_s_b1": step_bytes * b1["decode_tok_s"] / 1e9 if b1 else None,
            "fraction_b1": step_bytes * b1["decode_tok_s"] / bw if b1 else None,
        }
    top = max(rows, key=lambda r: r["batch"])
    result["summary"] = {
        "tokens_per_s": top["decode_tok_s"],
        "tokens_per_s_b1": b1["decode_tok_s"] if b1 else None,
        "ttft_ms": b1["ttft_ms"] if b1 else rows[0]["ttft_ms"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
    return result


def run_benchmark(engine: Engine, batch_sizes: tuple[int, ...] = DEFAULT_BATCHES, prompt_len: int = 128,
                  gen_len: int = 64, progress: bool = True, **kw) -> dict:
    """Benchmark a started engine (see module docstring). Callable with or without a running
    event loop: inside one, it runs on a helper thread with its own loop and blocks until done
    (use `await arun_benchmark(...)` there to stay non-blocking)."""
    coro = arun_benchmark(engine, batch_sizes, prompt_len, gen_len, progress, **kw)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name="agora-benchmark")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
