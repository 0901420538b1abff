"""What the Agora coordinator adds on the buyer's path, against the same upstream called
directly and through LiteLLM's proxy, in one interleaved run.

    .venv/bin/python bench/overhead.py --quick      # < 1 min: serial + 32 concurrent streams
    .venv/bin/python bench/overhead.py              # full: + non-stream load, 256 streams, profile

Paths, each in front of one minimal OpenAI-compatible upstream (`bench/upstream.py --fixed --mode text`:
canned text tokens, `--delay-ms` between them, `usage`):
  direct   the upstream itself;
  litellm  LiteLLM's proxy (`litellm[proxy]` installed by this script into `.venv-litellm`;
           skipped with the reason, and its keys null, if it cannot be);
  agora    embedded: `agora serve` on SQLite with the in-process Celery worker, plus one
           `agora node --engine openai --max-concurrency 32`;
  pg       production: `agora serve` + `agora worker --beat` on a fresh PostgreSQL database
           (dropped after) with Redis as broker and token relay, plus the same kind of node.
The upstream gives no log-probs or token ids, so its node is an unverifiable seller (the
operator allows them: AGORA_ALLOW_UNVERIFIED_NODES, the buyer asks with
routing.allow_unverified) and no job is ever audited: the audit rate is 0 and the figures are
the relay itself. Canaries and rate limits are off.

The buyer is raw httpx (async, one keep-alive pool per path; no `openai` client), chat
completions, `max_tokens` tokens (16), temperature 0. Serial: rounds of one streamed and one
whole request per path, path order shuffled each round. "added X" is X's percentile on the
path minus the same percentile called directly. Per chunk: (last token - first token) /
(chunks - 1), median, minus direct. [DONE] after the last token: median on the path itself.
Concurrent: C closed-loop clients per path for a fixed window (requests ending in it count),
paths in turn; CPU seconds of each process tree (from /proc) over the window / requests.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead_procs import (
    upstream_argv,
    ROOT,
    TREE,
    Procs,
    cpu_seconds,
    ensure_litellm,
    free_port,
    litellm_argv,
    litellm_version,
    pg_create,
    pg_drop,
    pyspy_exe,
    reachable,
    summarize_pyspy,
    wait_for,
)
from results import emit  # noqa: E402  (bench/results.py)

PY = sys.executable
MODEL = "bench"
MESSAGES = [{"role": "user", "content": "Quote me a price for one million tokens, please."}]
BENCH_SETTINGS = {  # the relay alone: no audits (unverifiable seller), no canaries, no rate limits
    "AGORA_ALLOW_UNVERIFIED_NODES": "true", "AGORA_CANARY_INTERVAL_S": "0", "AGORA_AUDIT_NEW_JOBS": "0",
    "AGORA_AUDIT_SESSION_JOBS": "0", "AGORA_RATE_LIMIT_REQUESTS_PER_MIN": "0",
    "AGORA_RATE_LIMIT_TOKENS_PER_MIN": "0", "AGORA_RATE_LIMIT_CONCURRENT": "0",
    "AGORA_NODE_RATE_LIMIT_PER_MIN": "0", "AGORA_ASSIGN_TIMEOUT_S": "120"}


@dataclass
class Target:
    name: str
    v1: str
    headers: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    pids: dict = field(default_factory=dict)  # process name -> pid (CPU accounting)


T0 = time.monotonic()


def _log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:5.1f}s] {msg}", file=sys.stderr, flush=True)


def _p(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def _r(x, nd=2):
    return None if x is None else round(x, nd)


# ---------------------------------------------------------------------------- one request
async def one(client: httpx.AsyncClient, t: Target, stream: bool, max_tokens: int) -> dict:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, **t.extra}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    rec = {"ok": False, "start": time.perf_counter()}
    try:
        if not stream:
            r = await client.post(t.v1 + "/chat/completions", json=body, headers=t.headers)
            rec["end"] = time.perf_counter()
            rec["total"] = rec["ttft"] = rec["end"] - rec["start"]
            rec["ok"] = r.status_code == 200 and bool(r.json()["choices"][0]["message"]["content"])
            if not rec["ok"]:
                rec["err"] = f"HTTP {r.status_code} {r.text[:200]}"
            return rec
        chunks, first = 0, None
        async with client.stream("POST", t.v1 + "/chat/completions", json=body, headers=t.headers) as r:
            if r.status_code != 200:
                rec["err"] = f"HTTP {r.status_code} {(await r.aread())[:200]!r}"
                rec["end"] = time.perf_counter()
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                now, data = time.perf_counter(), line[5:].strip()
                if data == "[DONE]":
                    rec["done"] = now
                    continue
                for ch in json.loads(data).get("choices") or ():
                    if (ch.get("delta") or {}).get("content"):
                        chunks += 1
                        first = first or now
                        rec["last"] = now
        rec["end"] = time.perf_counter()
        if first is None or "done" not in rec:
            rec["err"] = f"stream ended without {'tokens' if first is None else '[DONE]'}"
            return rec
        rec.update(ok=True, ttft=first - rec["start"], total=rec["end"] - rec["start"], chunks=chunks,
                   per_chunk=(rec["last"] - first) / max(chunks - 1, 1), done_after=rec["done"] - rec["last"])
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        rec["end"], rec["err"] = time.perf_counter(), repr(exc)[:200]
    return rec


def _client(conc: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(180, connect=30), limits=httpx.Limits(
        max_connections=conc + 8, max_keepalive_connections=conc + 8))


# ---------------------------------------------------------------------------- phases
async def serial(targets: list[Target], rounds: int, warm: int, max_tokens: int) -> dict:
    out = {t.name: {"stream": [], "whole": [], "errors": 0, "err": None} for t in targets}
    clients = {t.name: _client(4) for t in targets}
    try:
        for i in range(warm + rounds):
            order = targets[:]
            random.shuffle(order)
            for t in order:
                for stream in (True, False):
                    rec = await one(clients[t.name], t, stream, max_tokens)
                    if not rec["ok"]:
                        out[t.name]["errors"] += 1
                        out[t.name]["err"] = rec.get("err")
                    elif i >= warm:
                        out[t.name]["stream" if stream else "whole"].append(rec)
    finally:
        for c in clients.values():
            await c.aclose()
    return out


def serial_figures(res: dict) -> dict:
    figs = {}
    for name, r in res.items():
        s, w = r["stream"], r["whole"]
        ms = lambda recs, k: [x[k] * 1000 for x in recs]
        figs[name] = {"n": len(s), "errors": r["errors"], "err": r["err"],
                      **{f"{k}_p{q}": _p(ms(recs, key), q) for k, recs, key in (
                          ("ttft", s, "ttft"), ("stream_total", s, "total"), ("whole_total", w, "total"))
                         for q in (50, 99)},
                      "per_chunk": _p(ms(s, "per_chunk"), 50), "done_after": _p(ms(s, "done_after"), 50)}
    return figs


async def load(t: Target, conc: int, stream: bool, seconds: float, warm: float, max_tokens: int) -> dict:
    recs: list[dict] = []
    t0 = time.perf_counter()
    w0, deadline = t0 + warm, t0 + warm + seconds
    cpu = {}
    client = _client(conc)

    async def worker(k: int):
        await asyncio.sleep(k * 0.002)  # a short ramp, not 256 connects at once
        while time.perf_counter() < deadline:
            recs.append(await one(client, t, stream, max_tokens))

    async def snap(at: float, key: str):
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        cpu[key] = (time.perf_counter(), cpu_seconds(t.pids))

    try:
        await asyncio.gather(*(worker(k) for k in range(conc)), snap(w0, "a"), snap(deadline, "b"))
    finally:
        await client.aclose()
    (ta, ca), (tb, cb) = cpu["a"], cpu["b"]
    inwin = [r for r in recs if r["ok"] and ta <= r["end"] <= tb]
    n = len(inwin)
    return {"rps": n / (tb - ta), "n": n, "errors": sum(1 for r in recs if not r["ok"]),
            "err": next((r["err"] for r in recs if not r["ok"]), None),
            "ttft_p50": _p([r["ttft"] * 1000 for r in inwin], 50), "ttft_p99": _p([r["ttft"] * 1000 for r in inwin], 99),
            "done_after_p50": _p([r["done_after"] * 1000 for r in inwin if "done_after" in r], 50),  # streams
            "cpu_ms_per_req": {k: round((cb[k] - ca[k]) * 1000 / max(n, 1), 2) for k in cb if k != "machine"},
            "cpu_share": {k: round((cb[k] - ca[k]) / (tb - ta), 3) for k in cb}}


# ---------------------------------------------------------------------------- the market
def agora_env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
    env.update(AGORA_HOME=str(home), PYTHONPATH=str(TREE[0]), **BENCH_SETTINGS, **extra)
    return env


def start_market(procs: Procs, tag: str, env: dict, upstream_v1: str, worker: bool) -> Target:
    """`agora serve` (+ `agora worker`), one `agora node --engine openai`, a funded buyer."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    serve = procs.spawn(f"{tag}-serve", [PY, "-m", "agora", "serve", "--port", str(port)], env)
    wait_for(lambda: httpx.get(base + "/healthz", timeout=1).status_code == 200, f"{tag} coordinator", 90,
             procs, [f"{tag}-serve"])
    names, pids = [f"{tag}-serve", f"{tag}-node"], {"coordinator": serve.pid}
    if worker:
        pids["worker"] = procs.spawn(f"{tag}-worker", [PY, "-m", "agora", "worker", "--beat", "--concurrency", "2"],
                                     env).pid
        names.append(f"{tag}-worker")
    pids["node"] = procs.spawn(f"{tag}-node", [
        PY, "-m", "agora", "node", "--coordinator", base, "--engine", "openai", "--upstream", upstream_v1,
        "--model", MODEL, "--price-in", "0.10", "--price-out", "0.20", "--max-concurrency", "32", "--no-bench",
        "--tokens-per-s", "1000", "--operator", "bench", "--key", str(Path(env["AGORA_HOME"]) / "node.pem")],
        env).pid
    out = subprocess.run([PY, "-m", "agora", "account", "create", "--credit", str(10**17)], env=env, cwd=TREE[0],
                         check=False, capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise RuntimeError(f"agora account create failed: {out.stderr[-500:]}")

    def live():
        data = httpx.get(base + "/v1/models", timeout=2).json()["data"]
        return any(m["id"] == MODEL and m["live_nodes"] + m.get("unverified_nodes", 0) >= 1 for m in data)

    wait_for(live, f"the {tag} node live", 90, procs, names)
    _log(f"{tag}: coordinator, node and buyer ready")
    return Target(tag, base + "/v1", {"Authorization": f"Bearer {out.stdout.strip()}"},
                  {"routing": {"allow_unverified": True}}, pids)


def spawn_litellm(procs: Procs, work: Path, upstream_v1: str):
    exe, why = ensure_litellm(ROOT / ".venv-litellm")
    if exe is None:
        return None, why, None
    port, key = free_port(), "sk-bench-" + uuid.uuid4().hex
    argv, env = litellm_argv(exe, work, upstream_v1, MODEL, port, key)
    return procs.spawn("litellm", argv, env), port, key


def start_litellm(procs: Procs, work: Path, upstream_v1: str, up_pid: int) -> tuple[Target | None, str]:
    p, port, key = spawn_litellm(procs, work, upstream_v1)
    if p is None:
        return None, port
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/health/liveliness", timeout=1).status_code == 200,
                 "LiteLLM's proxy", 120, procs, ["litellm"])
    except (RuntimeError, TimeoutError) as exc:
        return None, f"LiteLLM's proxy did not start: {' '.join(str(exc).split())[-300:]}"
    _log("litellm: proxy ready")
    return Target("litellm", f"http://127.0.0.1:{port}/v1", {"Authorization": f"Bearer {key}"}, {},
                  {"litellm": p.pid, "upstream": up_pid}), f"litellm {litellm_version(ROOT / '.venv-litellm')}"


# ---------------------------------------------------------------------------- report
def table(sf: dict, conc: dict, names: list[str]) -> str:
    d = sf["direct"]
    lines = [f"{'serial (ms)':<34}" + "".join(f"{n:>12}" for n in names)]

    def row(label, fn):
        vals = []
        for n in names:
            try:
                v = fn(sf[n])
            except (KeyError, TypeError):
                v = None
            vals.append(f"{v:>12.2f}" if isinstance(v, (int, float)) else f"{'-':>12}")
        lines.append(f"{label:<34}" + "".join(vals))

    for key, label in (("ttft", "TTFT stream"), ("stream_total", "total stream"), ("whole_total", "total non-stream")):
        for q in (50, 99):
            row(f"{label} p{q}", lambda f, k=f"{key}_p{q}": f[k])
            row(f"  added vs direct p{q}", lambda f, k=f"{key}_p{q}": f[k] - d[k])
    row("per relayed chunk p50", lambda f: f["per_chunk"])
    row("  added vs direct", lambda f: f["per_chunk"] - d["per_chunk"])
    row("[DONE] after last token p50", lambda f: f["done_after"])
    row("requests (stream) / errors", lambda f: None)
    lines[-1] = f"{'requests (stream, whole) / errors':<34}" + "".join(
        f"{str(sf[n]['n']) + ' / ' + str(sf[n]['errors']):>12}" if n in sf else f"{'-':>12}" for n in names)
    lines += [f"  last serial error {n}: {sf[n]['err']}" for n in names if sf.get(n, {}).get("err")]
    for label, res in conc.items():
        lines.append(f"\nconcurrent {label}" + "".join(f"{n:>12}" for n in names))
        for k, f in (("req/s", lambda r: r["rps"]), ("TTFT p50 ms", lambda r: r["ttft_p50"]),
                     ("TTFT p99 ms", lambda r: r["ttft_p99"]), ("errors", lambda r: r["errors"]),
                     ("[DONE] after last token p50 ms", lambda r: r["done_after_p50"])):
            lines.append(f"  {k:<32}" + "".join(f"{f(res[n]):>12.1f}" if n in res and f(res[n]) is not None
                                                else f"{'-':>12}" for n in names))
        for n in names:
            if n in res:
                cpu = ", ".join(f"{p} {v:.1f} ms ({res[n]['cpu_share'][p]:.0%} core)"
                                for p, v in res[n]["cpu_ms_per_req"].items())
                cpu += f"; machine busy {res[n]['cpu_share']['machine']:.2f} of {os.cpu_count()} cores"
                lines.append(f"  cpu/req {n:<8} {cpu}")
                if res[n]["err"]:
                    lines.append(f"  first error {n}: {res[n]['err']}")
    return "\n".join(lines)


def figures(sf: dict, conc: dict, prefix: str, name: str) -> dict:
    f, d = sf.get(name), sf["direct"]
    sub = lambda k: None if f is None or f[k] is None else _r(f[k] - d[k])
    out = {f"{prefix}added_ttft_p50_ms": sub("ttft_p50"), f"{prefix}added_ttft_p99_ms": sub("ttft_p99"),
           f"{prefix}added_stream_total_p50_ms": sub("stream_total_p50"),
           f"{prefix}added_stream_total_p99_ms": sub("stream_total_p99"),
           f"{prefix}added_total_p50_ms": sub("whole_total_p50"), f"{prefix}added_total_p99_ms": sub("whole_total_p99"),
           f"{prefix}added_per_chunk_ms": sub("per_chunk"),
           f"{prefix}done_after_last_token_ms": None if f is None else _r(f["done_after"], 3)}
    for label, key in (("c32 stream", "c32_stream"), ("c32 whole", "c32_nonstream"), ("c256 stream", "c256_stream")):
        r = conc.get(label, {}).get(name)
        out[f"{prefix}rps_{key}"] = None if r is None else _r(r["rps"], 1)
        for k, src in (("ttft_p99_{}_ms", "ttft_p99"), ("done_after_{}_ms", "done_after_p50")) if key.endswith("_stream") else ():
            out[prefix + k.format(key.split("_")[0])] = None if r is None else _r(r[src], 1)
        if r is not None:
            out[f"{prefix}cpu_ms_per_req_{key}"] = r["cpu_ms_per_req"]
    errs = (f or {}).get("errors", 0) + sum(r[name]["errors"] for r in conc.values() if name in r)
    out[f"{prefix}errors"] = errs if f is not None else None
    return out


# ---------------------------------------------------------------------------- profile
async def profile(t: Target, seconds: float, max_tokens: int, work: Path) -> dict | None:
    exe = pyspy_exe()
    if exe is None:
        print("profile skipped: py-spy not installed (pip install py-spy)", file=sys.stderr)
        return None
    raw = work / "pyspy.txt"
    spy = subprocess.Popen([  # noqa: ASYNC220 - started once, before the load
        exe, "record", "--pid", str(t.pids["coordinator"]), "--duration", str(int(seconds)),
        "--rate", "200", "--nonblocking", "--format", "raw", "--output", str(raw)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    res = await load(t, 32, True, seconds, 0.5, max_tokens)
    _, err = await asyncio.to_thread(spy.communicate)
    if not raw.exists():
        print(f"profile failed: {err[-300:]}", file=sys.stderr)
        return None
    return {"load": {k: res[k] for k in ("rps", "ttft_p99", "errors", "cpu_share")}, **summarize_pyspy(raw, 20)}


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="under a minute: fewer requests, no 256 / non-stream load")
    ap.add_argument("--tokens", type=int, default=16, help="max_tokens of every request")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="the upstream's inter-token delay")
    ap.add_argument("--rounds", type=int, help="serial rounds (each: 1 stream + 1 whole per path)")
    ap.add_argument("--seconds", type=float, help="window of each concurrent run")
    ap.add_argument("--no-litellm", action="store_true")
    ap.add_argument("--no-pg", action="store_true", help="skip the production path")
    ap.add_argument("--profile", type=float, help="seconds of py-spy on the embedded coordinator under 32 "
                    "concurrent streams (default 20, 0 with --quick)")
    ap.add_argument("--tree", help="run the market (agora serve/worker/node) from this source tree, e.g. a "
                    "`git archive HEAD` snapshot; default: this checkout")
    ap.add_argument("--profile-out", help="write the profile summary (JSON) here")
    args = ap.parse_args(argv)
    rounds = args.rounds or (15 if args.quick else 150)
    seconds = args.seconds or (2.0 if args.quick else 6.0)
    prof_s = args.profile if args.profile is not None else (0 if args.quick else 20)
    started = time.monotonic()
    if args.tree:
        TREE[0] = Path(args.tree).resolve()
        if not (TREE[0] / "agora" / "__main__.py").exists():
            ap.error(f"--tree {args.tree}: no agora package there")
    work = Path(tempfile.mkdtemp(prefix="agora-overhead-"))
    procs = Procs(work / "logs", cwd=TREE[0])
    pg_db, notes = None, []
    try:
        up_port = free_port()
        up = procs.spawn("upstream", upstream_argv(up_port, MODEL, args.delay_ms))
        up_v1 = f"http://127.0.0.1:{up_port}/v1"
        wait_for(lambda: httpx.get(up_v1 + "/models", timeout=1).status_code == 200, "the upstream", 30, procs)
        direct = Target("direct", up_v1, pids={"upstream": up.pid})
        jobs = {}
        with ThreadPoolExecutor(3) as pool:
            if not args.no_litellm:
                jobs["litellm"] = pool.submit(start_litellm, procs, work, up_v1, up.pid)
            jobs["agora"] = pool.submit(start_market, procs, "agora", agora_env(work / "emb"), up_v1, False)
            if not args.no_pg:
                if not (reachable("127.0.0.1", 5432) and reachable("127.0.0.1", 6379)):
                    notes.append("production path skipped: PostgreSQL or Redis not reachable")
                else:
                    tag = uuid.uuid4().hex[:8]
                    pg_db = f"overhead_bench_{tag}"
                    env = agora_env(work / "pg", AGORA_DATABASE_URL=pg_create(pg_db),
                                    AGORA_BROKER_URL="redis://127.0.0.1:6379/0", AGORA_REDIS_URL="redis://127.0.0.1:6379/0",
                                    AGORA_CELERY_QUEUE=f"agora-bench-{tag}", AGORA_REDIS_PREFIX=f"agora-bench-{tag}:",
                                    AGORA_MIN_STAKE_NANO_USD="0")
                    jobs["pg"] = pool.submit(start_market, procs, "pg", env, up_v1, True)
            targets = [direct]
            for name, job in jobs.items():
                try:
                    res = job.result()
                except Exception as exc:  # noqa: BLE001 - keep what works, say what did not
                    notes.append(f"{name} skipped: {' '.join(str(exc).split())[:600]}")
                    continue
                if name == "litellm":
                    res, why = res
                    if res is None:
                        notes.append(f"litellm skipped: {why}")
                        continue
                    notes.append(f"LiteLLM: {why}")
                targets.append(res)
        for t in targets:
            t.pids.setdefault("upstream", up.pid)
        names = [t.name for t in targets]
        print(f"started in {time.monotonic() - started:.1f}s: {', '.join(names)}; logs in {work / 'logs'}",
              file=sys.stderr, flush=True)
        for n in notes:
            print(n, file=sys.stderr, flush=True)

        async def run_all():
            sres = await serial(targets, rounds, 3 if args.quick else 10, args.tokens)
            conc = {}
            plan = [("c32 stream", 32, True)] + ([] if args.quick else [("c32 whole", 32, False),
                                                                        ("c256 stream", 256, True)])
            for i, (label, c, stream) in enumerate(plan):
                conc[label] = {}
                order = targets if i % 2 == 0 else targets[::-1]
                for t in order:
                    win = seconds if c <= 32 or args.seconds else max(seconds, 10.0)  # 256: past the first wave
                    conc[label][t.name] = await load(t, c, stream, win, 0.5 if args.quick else 1.5, args.tokens)
                    await asyncio.sleep(0.5)  # let background settlement drain before the next path
            prof = None
            agora = next((t for t in targets if t.name == "agora"), None)
            if prof_s > 0 and agora is not None:
                prof = await profile(agora, prof_s, args.tokens, work)
            return sres, conc, prof

        sres, conc, prof = asyncio.run(run_all())
        sf = serial_figures(sres)
        print(f"\nAgora coordinator overhead: {rounds} serial rounds, {args.tokens} tokens per request, upstream "
              f"delay {args.delay_ms} ms/token, buyer = raw httpx (chat completions); {os.cpu_count()} CPUs")
        print(table(sf, conc, names))
        out = {}
        out.update(figures(sf, conc, "", "agora"))
        out.update(figures(sf, conc, "litellm_", "litellm"))
        out.update(figures(sf, conc, "pg_", "pg"))
        out.update({f"direct_{k}": _r(sf["direct"][k]) for k in ("ttft_p50", "ttft_p99", "whole_total_p50",
                                                                 "per_chunk", "done_after")})
        if "c32 stream" in conc:
            out["direct_rps_c32_stream"] = _r(conc["c32 stream"]["direct"]["rps"], 1)
        for k in ("", "pg_"):
            a, b = out.get(f"{k}rps_c32_stream"), out.get("litellm_rps_c32_stream")
            out[f"{k}rps_vs_litellm"] = _r(a / b) if a and b else None
        if prof:
            print(f"\nprofile: py-spy on the embedded coordinator, {prof_s:.0f}s of 32 concurrent streams "
                  f"({prof['load']['rps']:.1f} req/s, {prof['samples']} samples, non-idle threads)")
            for title in ("threads", "categories", "inclusive_own", "innermost_own", "self"):
                print(f"  by {title.replace('_own', ' (project functions)')}:")
                for k, v in prof[title][:15]:
                    print(f"    {v:6.1%}  {k}")
            if args.profile_out:
                Path(args.profile_out).write_text(json.dumps(prof, indent=1))
        out["notes"] = notes
        out["quick"] = args.quick
        out["seconds"] = round(time.monotonic() - started, 1)
        emit("overhead", out)
        return 0
    finally:
        procs.stop()
        if pg_db:
            with contextlib.suppress(Exception):
                pg_drop(pg_db)
        if os.environ.get("OVERHEAD_KEEP_LOGS"):
            print(f"logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
