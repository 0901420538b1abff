"""What a response-cache hit costs, against the same request answered by the market, in one run.

    .venv/bin/python bench/cache.py --quick     # < 1 min
    .venv/bin/python bench/cache.py             # more samples
    .venv/bin/python bench/cache.py --redis redis://127.0.0.1:6379/0   # the cache in Redis (production store)

One process: the embedded coordinator (SQLite, in-process Celery worker) on a real port and
one seller on the built-in engine (`tiny`, CPU). The buyer is httpx (keep-alive), chat
completions, 16 tokens, temperature 0, streamed. Rounds interleave a market request (a fresh
prompt with `X-Agora-Cache: skip`: admission, hold, routing, the node, the relay) and a hit
(the same request again with `use`, after one fill), so both see the same machine load.

Figures:
  cache_hit_ms_p50/p99   server time of a hit: the `Server-Timing: cache;dur=` the coordinator
                         reports (from its handler's start to the answer built; the HTTP
                         framework's parsing and auth-cache lookup come before it);
  cache_priced_hit_ms_p50  the same with a non-zero cache price (the charge and the request
                         record are written before the answer);
  cache_vs_market_ttft_ratio  client time to the first content chunk, hit p50 / market p50.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

try:
    from results import emit
except ImportError:  # before bench/results.py: print the line only
    def emit(name: str, figures: dict) -> None:
        print(json.dumps(figures))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


class Market:
    """The embedded coordinator on a free port and one seller on the built-in engine."""

    def __init__(self, home: Path, redis_url: str | None):
        import socket

        import uvicorn

        from coordinator.app import create_app
        from coordinator.db import create_all, make_engine
        from coordinator.runtime import Runtime
        from coordinator.settings import CoordinatorSettings

        over = {"redis_url": redis_url, "redis_prefix": f"agora-bench-{uuid.uuid4().hex[:8]}:"} if redis_url else {}
        self.settings = CoordinatorSettings(home=home, database_url=f"sqlite:///{home / 'b.db'}",
                                            run_worker_in_process=True, canary_interval_s=0, audit_new_jobs=0,
                                            audit_floor=1e-9, audit_session_jobs=0, rate_limit_requests_per_min=0,
                                            rate_limit_tokens_per_min=0, heartbeat_interval_s=1.0, **over)
        engine = make_engine(self.settings.effective_database_url)
        create_all(engine)
        self.rt = Runtime(self.settings, engine=engine)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(runtime=self.rt), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def start_seller(self) -> None:
        from node_agent.agent import NodeAgent
        from node_agent.engines.builtin import load_builtin_engine
        from node_agent.identity import Identity
        from node_agent.settings import NodeSettings

        async def run():
            eng = load_builtin_engine("tiny", max_batch=4)
            await eng.start()
            agent = NodeAgent(NodeSettings(coordinator=self.base, model="tiny", region="eu-west", max_concurrency=4,
                                           advertised_tokens_per_s=50.0, heartbeat_interval_s=1.0), eng,
                              Identity.generate())
            await agent.run()

        self.seller = asyncio.run_coroutine_threadsafe(run(), self.loop)

    def wait(self, cond, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except (httpx.HTTPError, KeyError):
                pass
            time.sleep(0.1)
        raise TimeoutError(what)

    def buyer(self) -> str:
        from coordinator.account_service import create_account

        with self.rt.session() as s:
            account, key = create_account(s, "bench", 10**15)
        return key

    def stop(self) -> None:
        if getattr(self, "seller", None) is not None:
            self.seller.cancel()
            time.sleep(0.3)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.server.should_exit = True
        time.sleep(0.3)
        if self.settings.redis_url:  # leave nothing behind in a shared Redis
            store = self.rt.response_cache
            for k in store._redis.scan_iter(f"{self.settings.redis_prefix}*"):
                store._redis.delete(k)
        self.rt.stop()


def ask(client: httpx.Client, prompt: str, mode: str) -> tuple[float, dict, str]:
    """(seconds to the first content chunk, response headers, the streamed text)."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    first = None
    text = []
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"X-Agora-Cache": mode}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.read()!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            if delta.get("content") is not None and first is None:
                first = time.perf_counter() - t0
            text.append(delta.get("content") or "")
    return first if first is not None else time.perf_counter() - t0, dict(r.headers), "".join(text)


def server_ms(headers: dict) -> float:
    return float(headers["server-timing"].split("dur=")[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer samples, under a minute")
    p.add_argument("--redis", help="keep the cache in this Redis (the production store) instead of memory")
    args = p.parse_args(argv)
    rounds, hits_per_round = (30, 10) if args.quick else (150, 10)
    with tempfile.TemporaryDirectory() as tmp:
        m = Market(Path(tmp), args.redis)
        try:
            m.wait(lambda: m.server.started, "the coordinator to start", 20)
            m.start_seller()
            m.wait(lambda: any(x["id"] == "tiny" and x["live_nodes"] >= 1
                               for x in httpx.get(m.base + "/v1/models").json()["data"]), "a live seller", 120)
            key = m.buyer()
            with httpx.Client(base_url=m.base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
                for i in range(5):  # warm up both paths
                    ask(c, f"warm {i}", "skip")
                _, _, text = ask(c, "the cached question", "use")  # the fill
                for _ in range(20):
                    ask(c, "the cached question", "use")
                market, hit_client, hit_server = [], [], []
                for r in range(rounds):  # interleaved: the same load for both
                    t, _, _ = ask(c, f"question {r} {uuid.uuid4().hex[:6]}", "skip")
                    market.append(t)
                    for _ in range(hits_per_round):
                        t, h, got = ask(c, "the cached question", "use")
                        assert h.get("x-agora-cache") == "hit" and got == text, (h, got, text)
                        hit_client.append(t)
                        hit_server.append(server_ms(h))
                m.settings.response_cache_price_per_request = 1000  # priced: the charge is written first
                priced = []
                for _ in range(rounds):
                    _, h, _ = ask(c, "the cached question", "use")
                    priced.append(server_ms(h))
        finally:
            m.stop()
    market_ms = [x * 1000 for x in market]
    hit_ms = [x * 1000 for x in hit_client]
    _log(f"market TTFT p50 {statistics.median(market_ms):.2f} ms (n={len(market_ms)}); "
         f"hit client p50 {statistics.median(hit_ms):.2f} ms, server p50 {pct(hit_server, 50):.3f} "
         f"p99 {pct(hit_server, 99):.3f} ms (n={len(hit_server)}); priced hit server p50 {pct(priced, 50):.3f} ms")
    figures = {
        "cache_hit_ms_p50": round(pct(hit_server, 50), 3),
        "cache_hit_ms_p99": round(pct(hit_server, 99), 3),
        "cache_priced_hit_ms_p50": round(pct(priced, 50), 3),
        "cache_hit_client_ms_p50": round(statistics.median(hit_ms), 3),
        "market_ttft_ms_p50": round(statistics.median(market_ms), 3),
        "cache_vs_market_ttft_ratio": round(statistics.median(hit_ms) / statistics.median(market_ms), 4),
        "store": "redis" if args.redis else "memory",
        "quick": args.quick,
    }
    emit("cache", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
