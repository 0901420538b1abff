"""The Batch API on idle capacity (issue 16): a batch of N lines through the official `openai`
client (files.create + batches.create, polled to completion) while interactive traffic goes on
in the same embedded market (`agora serve` + two `agora node --engine openai` sellers in front
of the bench upstream: one at 0.20, one at 0.10 USD per million output tokens).

Figures, each measured against a baseline in the same run:
- `batch_lines_per_s`: lines completed per second, batch created -> completed.
- `interactive_p99_ttft_ratio`: interactive streamed TTFT p99 while the batch runs ÷ the same
  load's p99 just before it (target <= 1.20).
- `batch_cost_ratio`: what the batch paid per token ÷ what interactive requests of the same
  tokens paid per token (the batch discount routes lines to the cheaper seller).
One function per measurement (a later one, e.g. the response cache's `cache_hit_ms_p50`,
adds its own); the JSON line with every figure is printed last.

    .venv/bin/python bench/batch.py --quick    # < 1 minute: 200 lines
    .venv/bin/python bench/batch.py            # 1,000 lines
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import openai  # noqa: E402

import overhead as ov  # noqa: E402
from overhead_procs import Procs, free_port, upstream_argv, wait_for  # noqa: E402

try:
    from results import emit  # noqa: E402  (bench/results.py: regression tracking saves the figures too)
except ImportError:  # pragma: no cover - a tree without it: print the line alone
    def emit(name: str, figures: dict) -> dict:
        print(json.dumps(figures), flush=True)
        return figures

MAX_TOKENS = 16
INTERACTIVE_CONC = 4


def _body(t: ov.Target) -> dict:
    return {"model": ov.MODEL, "messages": ov.MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, **t.extra}


async def interactive(t: ov.Target, seconds: float, until=None) -> list[float]:
    """Closed-loop streamed requests at INTERACTIVE_CONC for `seconds` (or until `until()`); TTFTs."""
    ttfts: list[float] = []
    stop = time.monotonic() + seconds
    async with ov._client(INTERACTIVE_CONC) as client:
        async def worker():
            while time.monotonic() < stop and not (until and until()):
                rec = await ov.one(client, t, True, MAX_TOKENS)
                if rec["ok"]:
                    ttfts.append(rec["ttft"])
        await asyncio.gather(*(worker() for _ in range(INTERACTIVE_CONC)))
    return ttfts


def interactive_cost_per_token(t: ov.Target, n: int = 10) -> float:
    cost = tokens = 0
    with httpx.Client(timeout=60) as c:
        for _ in range(n):
            u = c.post(t.v1 + "/chat/completions", json=_body(t), headers=t.headers).json()["usage"]
            cost, tokens = cost + u["cost_nano_usd"], tokens + u["total_tokens"]
    return cost / tokens


def run_batch(t: ov.Target, lines: int, done_flag: list) -> dict:
    """Upload, create, poll to completion; lines/s and cost per token from the output file."""
    oc = openai.OpenAI(base_url=t.v1, api_key=t.headers["Authorization"].split()[1], max_retries=2, timeout=60)
    data = "".join(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": _body(t)}) + "\n" for i in range(lines)).encode()
    f = oc.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")
    t0 = time.perf_counter()
    b = oc.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.1)
        b = oc.batches.retrieve(b.id)
    elapsed = time.perf_counter() - t0
    done_flag.append(True)
    if b.status != "completed" or b.request_counts.completed != lines:
        raise RuntimeError(f"batch ended {b.status}: {b.request_counts}")
    out = [json.loads(x) for x in oc.files.content(b.output_file_id).content.decode().splitlines()]
    cost = sum(o["response"]["body"]["usage"]["cost_nano_usd"] for o in out)
    tokens = sum(o["response"]["body"]["usage"]["total_tokens"] for o in out)
    return {"seconds": elapsed, "lines_per_s": lines / elapsed, "cost_per_token": cost / tokens}


def cache_hits(t: ov.Target, n: int) -> dict:
    """The response cache on the same market: one deterministic streamed request fills it
    (`X-Agora-Cache: use`), then `n` identical ones are hits; server time from each hit's
    `Server-Timing` header (handler start to built answer), against the first (market) answer."""
    body = {**_body(t), "messages": [{"role": "user", "content": "cache me"}], "stream": True}
    headers = {**t.headers, "X-Agora-Cache": "use"}
    served, first = [], None
    with httpx.Client(timeout=60) as c:
        for i in range(n + 1):
            t0 = time.perf_counter()
            with c.stream("POST", t.v1 + "/chat/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"cache request: {r.status_code} {r.read()!r}")
                for _ in r.iter_lines():
                    pass
            if i == 0:
                first = time.perf_counter() - t0
                continue
            if r.headers.get("x-agora-cache") != "hit":
                raise RuntimeError(f"request {i} was not a cache hit: {dict(r.headers)}")
            served.append(float(r.headers["server-timing"].split("dur=")[1]))
    served.sort()
    ov._log(f"response cache: {n} hits, server time p50 {served[len(served) // 2]:.3f} ms "
            f"(the market answer that filled it: {first * 1e3:.1f} ms at the client)")
    return {"cache_hit_ms_p50": round(served[len(served) // 2], 3),
            "cache_hit_ms_p99": round(served[min(len(served) - 1, int(0.99 * len(served)))], 3)}


async def measure_batch(t: ov.Target, lines: int, seconds: float) -> dict:
    """Interactive TTFT p99 alone, then while the batch runs (the same load); the batch's figures."""
    await interactive(t, 2.0)  # warm up
    alone = await interactive(t, seconds)
    done: list = []
    batch_task = asyncio.create_task(asyncio.to_thread(run_batch, t, lines, done))
    during = await interactive(t, seconds * 3, until=lambda: bool(done))
    batch = await batch_task
    p_alone, p_during = ov._p(alone, 99), ov._p(during, 99)
    ov._log(f"interactive TTFT p99 alone {p_alone * 1e3:.1f} ms ({len(alone)} req), during the batch "
            f"{p_during * 1e3:.1f} ms ({len(during)} req); batch {lines} lines in {batch['seconds']:.1f}s")
    return {"batch_lines_per_s": round(batch["lines_per_s"], 1),
            "interactive_p99_ttft_ratio": round(p_during / p_alone, 3),
            "_batch_cost_per_token": batch["cost_per_token"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 lines, 8 s load phases (< 1 minute)")
    ap.add_argument("--lines", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=None, help="length of the interactive baseline phase")
    args = ap.parse_args(argv)
    lines = args.lines or (200 if args.quick else 1000)
    seconds = args.seconds or (6.0 if args.quick else 20.0)
    work = Path(tempfile.mkdtemp(prefix="agora-batch-bench-"))
    procs = Procs(work / "logs")
    up_port = free_port()
    procs.spawn("upstream", upstream_argv(up_port, ov.MODEL))
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{up_port}/v1/models", timeout=1).status_code == 200,
                 "the upstream", 30, procs)
        env = ov.agora_env(work / "home", AGORA_BATCH_MAX_IN_FLIGHT=os.environ.get("AGORA_BATCH_MAX_IN_FLIGHT", "4"))
        t = ov.start_market(procs, "agora", env, f"http://127.0.0.1:{up_port}/v1", False)
        base = t.v1.removesuffix("/v1")
        procs.spawn("cheap-node", [ov.PY, "-m", "agora", "node", "--coordinator", base, "--engine", "openai",
                                   "--upstream", f"http://127.0.0.1:{up_port}/v1", "--model", ov.MODEL,
                                   "--price-in", "0.05", "--price-out", "0.10", "--max-concurrency", "32",
                                   "--no-bench", "--tokens-per-s", "1000", "--operator", "cheap",
                                   "--key", str(work / "home" / "cheap.pem")], env)
        wait_for(lambda: sum(m["live_nodes"] + m.get("unverified_nodes", 0) for m in httpx.get(
            base + "/v1/models", timeout=2).json()["data"] if m["id"] == ov.MODEL) >= 2, "two sellers", 90, procs)
        figures = asyncio.run(measure_batch(t, lines, seconds))
        interactive_cpt = interactive_cost_per_token(t)
        figures["batch_cost_ratio"] = round(figures.pop("_batch_cost_per_token") / interactive_cpt, 3)
        figures.update(cache_hits(t, 50 if args.quick else 200))
        figures.update(lines=lines, mode="quick" if args.quick else "full")
    finally:
        procs.stop()
    emit("batch", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
