"""Dashboard pages' server time with 1,000 nodes and 30 days of per-minute history.

    .venv/bin/python bench/dashboard.py --quick     # < 60 s: 3 days of history (see below)
    .venv/bin/python bench/dashboard.py             # the target: 30 days of history
    .venv/bin/python bench/dashboard.py --profile   # also profile the slowest page

Target (issue 14): "Dashboard pages render in <= 300 ms server time with 1,000 nodes and 30
days of per-minute history".

A SQLite database (the embedded default) in a temporary directory, migrated with
`coordinator.migrate.upgrade`, filled directly (no node agents):
  nodes        1,000 registered nodes (live: connected, heard from now; the run's heartbeat
               timeout is set out of reach so none goes offline while it is measured), one
               offer each over 4 models, varied regions, engines, prices, claimed and
               measured speeds; an earnings ledger account each (`Ledger.open_account`, as
               `node_registry.register` opens it)
  market       one `MarketMinute` per model and minute over the history window (30 days:
               43,200 per model)
  node history `NodeMinute`: the whole window for a sample of nodes (the node page and the
               coach are timed on one of them) and the last hours for every other node
               (30 days for all 1,000 would be 43 M rows; a node's page reads only its own
               rows by the node_id index, so the sample gives it the same per-node work)
  requests     completed (and some failed) `InferenceRequest` rows over the window, a share
               of them the measured buyer's (its usage page), the rest from other buyers
Each page is fetched in-process through `fastapi.testclient.TestClient(create_app(runtime=
Runtime(settings, engine=...)))` signed in as the operator (POST /login with the admin
token), a warm-up, then --rounds rounds; server time is measured by an ASGI wrapper around
the app, from the request's arrival to its last body byte (no client or transport time).

Baseline in the same run: the same pages on a copy of the same database before any
per-minute history was written (same nodes and requests); `history_cost_ratio` = the worst
page's p99 with history / the worst page's p99 without.

Progress goes to stderr; the last line of stdout is one JSON object: p99_page_ms (the worst
page's p99), p50_page_ms, target_ms, met, history_rows, market_minute_rows, node_minute_rows,
request_rows, nodes, days, pages ({page: {p50_ms, p99_ms, baseline_p50_ms, baseline_p99_ms,
sql_execute_share}}), history_cost_ratio, rounds, quick. sql_execute_share is the share of
server time inside cursor.execute: SQLite steps the rest of a query while its rows are
fetched, so it is a lower bound; the profile's own-time table shows fetchall too.

--profile (or any page over the target) profiles that page's handler (cProfile, the
rendering work run inline) and times every SQL statement it runs; the top entries go to
stderr and into the JSON as `profile`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import secrets
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from results import emit  # noqa: E402  (bench/results.py)
from sqlalchemy import event, insert  # noqa: E402

TARGET_MS = 300.0
MODELS = ("tiny", "llama-3.1-8b", "mistral-7b", "qwen2.5-14b")
REGIONS = ("us-east", "us-west", "eu-west", "eu-central", "ap-southeast", "ap-northeast", "sa-east", "af-south")
ENGINES = ("builtin", "vllm", "openai")
ADMIN = "bench-admin-token"


def log(msg: str) -> None:
    print(f"[dashboard-bench] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- building the database

def build_market(url: str, nodes: int, rng: random.Random):
    """Nodes with offers and earnings accounts, buyers; returns (node ids by model, buyer id)."""
    from coordinator.account_service import create_account
    from coordinator.db import make_engine, session_scope
    from coordinator.models import Node, NodeOffer
    from coordinator.models.account import utcnow
    from pricing.ledger import AccountKind, Ledger

    engine = make_engine(url)
    now = utcnow()
    by_model: dict[str, list[str]] = {m: [] for m in MODELS}
    with session_scope(engine) as s:
        led = Ledger(s)
        for i in range(nodes):
            nid = secrets.token_hex(32)
            model = MODELS[i % len(MODELS)]
            by_model[model].append(nid)
            earnings = led.open_account(AccountKind.SELLER_EARNINGS, ref=f"node:{nid}")
            claimed = rng.uniform(20, 400)
            measured = claimed * rng.uniform(0.6, 1.05)
            s.add(Node(id=nid, earnings_account_id=earnings.id, name=f"bench-{i:04d}", region=rng.choice(REGIONS),
                       max_concurrency=rng.choice((4, 8, 16, 32)), engine=rng.choice(ENGINES), registered_at=now,
                       last_heartbeat_at=now, channel_connected=True, online=True,
                       reputation=rng.uniform(0.3, 1.0), rtt_ms=rng.uniform(5, 150), jobs=rng.randint(0, 5000),
                       audits_passed=rng.randint(0, 200), audits_failed=rng.choice((0, 0, 0, 1, 2)),
                       error_rate=rng.uniform(0, 0.05)))
            s.add(NodeOffer(node_id=nid, model=model, price_in=rng.randint(2, 50) * 10**7,
                            price_out=rng.randint(5, 200) * 10**7, tokens_per_s=claimed, tokens_per_s_b1=claimed,
                            ttft_ms=rng.uniform(50, 800), measured_tokens_per_s=measured,
                            measured_ttft_ms=rng.uniform(50, 900), claim_ratio=measured / claimed))
        buyer, _ = create_account(s, "bench-buyer", 10**15)
        others = [create_account(s, f"buyer-{k}", 10**15)[0].id for k in range(20)]
        buyer_id = buyer.id
    return engine, by_model, buyer_id, others


def chunked_insert(engine, table, rows_iter, chunk: int = 50_000) -> int:
    n = 0
    batch: list[dict] = []
    with engine.begin() as conn:
        for row in rows_iter:
            batch.append(row)
            if len(batch) >= chunk:
                conn.execute(insert(table), batch)
                n += len(batch)
                batch = []
        if batch:
            conn.execute(insert(table), batch)
            n += len(batch)
    return n


def insert_requests(engine, by_model, buyer_id: str, others: list[str], count: int, buyer_share: float,
                    days: float, rng: random.Random) -> int:
    from coordinator.models import InferenceRequest
    from coordinator.models.account import utcnow

    now = utcnow()
    span = days * 86400

    def rows():
        for i in range(count):
            model = MODELS[i % len(MODELS)]
            created = now - timedelta(seconds=span * (rng.random() ** 1.5))  # busier lately
            ttft = rng.uniform(0.05, 0.9)
            toks = rng.randint(16, 512)
            done = created + timedelta(seconds=ttft + toks * rng.uniform(0.005, 0.04))
            failed = rng.random() < 0.02
            yield {"id": "req_" + secrets.token_hex(12), "account_id": buyer_id if rng.random() < buyer_share
                   else rng.choice(others), "model": model, "kind": "chat", "status": "failed" if failed else "completed",
                   "payload": {}, "routing": {}, "prompt_tokens_est": 64, "max_tokens": 512, "hold_amount": 0,
                   "node_id": rng.choice(by_model[model]), "price_in": 10**8, "price_out": 4 * 10**8,
                   "prompt_tokens": 64, "completion_tokens": 0 if failed else toks,
                   "cost": 0 if failed else (64 * 10**8 + toks * 4 * 10**8) // 10**6,
                   "delivered_tokens": 0 if failed else toks, "finish_reason": None if failed else "length",
                   "error": "node stalled" if failed else None, "created_at": created, "assigned_at": created,
                   "first_token_at": created + timedelta(seconds=ttft), "finished_at": done}

    return chunked_insert(engine, InferenceRequest.__table__, rows())


def insert_market_minutes(engine, by_model, days: float, rng: random.Random) -> int:
    from coordinator.history import minute_of
    from coordinator.models import MarketMinute
    from coordinator.models.account import utcnow

    end = minute_of(utcnow())
    n_min = int(days * 1440)
    nrng = np.random.default_rng(rng.randint(0, 2**31))

    def rows():
        for model, ids in by_model.items():
            live = len(ids)
            reqs = nrng.poisson(40, n_min)
            base_ask = nrng.uniform(2e8, 6e8)
            for k in range(n_min):
                r = int(reqs[k])
                toks = r * 180
                yield {"minute": end - timedelta(minutes=n_min - k), "model": model, "nodes_live": live,
                       "capacity": live * 12, "active": r // 3, "ask_out_p10": int(base_ask * 0.4),
                       "ask_out_p50": int(base_ask), "ask_out_p90": int(base_ask * 2.5), "ask_in_p50": int(base_ask / 4),
                       "tok_s_p50": 120.0, "tok_s_p90": 300.0, "requests": r, "completed": r - r // 50,
                       "failed": r // 50, "rejected": 0, "failed_over": r // 100, "prompt_tokens": r * 64,
                       "completion_tokens": toks, "volume": toks * 400, "fees": toks * 20,
                       "ttft_p50_ms": 180.0 + k % 7, "ttft_p90_ms": 420.0, "ttft_p99_ms": 900.0,
                       "itl_p50_ms": 12.0, "itl_p99_ms": 45.0, "audits_passed": r // 20, "audits_failed": int(k % 997 == 0)}

    return chunked_insert(engine, MarketMinute.__table__, rows())


def insert_node_minutes(engine, by_model, sample: set[str], days: float, recent_h: float,
                        rng: random.Random) -> int:
    from coordinator.history import minute_of
    from coordinator.models import NodeMinute
    from coordinator.models.account import utcnow

    end = minute_of(utcnow())

    def rows():
        for model, ids in by_model.items():
            for nid in ids:
                n_min = int(days * 1440) if nid in sample else int(recent_h * 60)
                price_out = rng.randint(5, 200) * 10**7
                tok_s = rng.uniform(20, 400)
                for k in range(n_min):
                    r = (k * 7 + len(nid)) % 5
                    yield {"minute": end - timedelta(minutes=n_min - k), "node_id": nid, "model": model, "online": True,
                           "routable": k % 211 != 0, "price_in": price_out // 4, "price_out": price_out,
                           "tok_s": tok_s, "ttft_ms": 200.0, "active": r % 3, "max_concurrency": 8, "requests": r,
                           "completed": r, "failed": 0, "completion_tokens": r * 180, "revenue": r * 180 * 400,
                           "audits_passed": int(r == 4), "audits_failed": 0, "reputation": 0.8}

    return chunked_insert(engine, NodeMinute.__table__, rows())


# ---------------------------------------------------------------- timing

class ServerTimer:
    """ASGI wrapper: seconds from a request's arrival to its last body byte."""

    def __init__(self, app):
        self.app = app
        self.last: float | None = None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()

        async def _send(msg):
            if msg["type"] == "http.response.body" and not msg.get("more_body"):
                self.last = time.perf_counter() - t0
            await send(msg)

        await self.app(scope, receive, _send)


class SqlClock:
    """Time spent in SQL statements (cursor execute), optionally per statement."""

    def __init__(self, engines: list):
        self.total = 0.0
        self.by_stmt: dict[str, list[float]] = {}
        self.detail = False
        self._t: dict[int, float] = {}
        for e in engines:
            event.listen(e, "before_cursor_execute", self._before)
            event.listen(e, "after_cursor_execute", self._after)

    def _before(self, conn, cursor, statement, params, context, executemany):
        self._t[id(cursor)] = time.perf_counter()

    def _after(self, conn, cursor, statement, params, context, executemany):
        dt = time.perf_counter() - self._t.pop(id(cursor), time.perf_counter())
        self.total += dt
        if self.detail:
            self.by_stmt.setdefault(" ".join(statement.split()), []).append(dt)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


@contextmanager
def app_client(url: str):
    from fastapi.testclient import TestClient

    from coordinator.app import create_app
    from coordinator.db import make_engine
    from coordinator.runtime import Runtime
    from coordinator.settings import CoordinatorSettings

    settings = CoordinatorSettings(home=Path(url.removeprefix("sqlite:///")).parent, database_url=url,
                                   admin_token=ADMIN, run_worker_in_process=False,
                                   heartbeat_timeout_s=10**9)  # nobody beats here: keep the fleet live
    rt = Runtime(settings, engine=make_engine(url))
    timer = ServerTimer(create_app(runtime=rt))
    clock = SqlClock([rt.engine])  # read_engine is an option view of it: its statements fire these events too
    try:
        with TestClient(timer) as client:
            r = client.post("/login", data={"credential": ADMIN}, follow_redirects=False)
            assert r.status_code == 303, r.text
            yield client, timer, clock
    finally:
        rt.stop()


def measure(url: str, pages: dict[str, str], rounds: int, warmup: int, label: str) -> dict[str, dict]:
    out: dict[str, dict] = {}
    with app_client(url) as (client, timer, clock):
        for name, path in pages.items():
            for _ in range(warmup):
                r = client.get(path)
                assert r.status_code == 200, (name, r.status_code, r.text[:300])
            times, sql = [], []
            for _ in range(rounds):
                clock.total = 0.0
                r = client.get(path)
                assert r.status_code == 200, (name, r.status_code, r.text[:300])
                times.append(timer.last * 1000)
                sql.append(clock.total * 1000)
            out[name] = {"p50_ms": round(pct(times, 50), 2), "p99_ms": round(pct(times, 99), 2),
                         "sql_execute_share": round(sum(sql) / sum(times), 3) if sum(times) else None,
                         "bytes": len(r.content)}
            log(f"{label:9s} {name:14s} p50 {out[name]['p50_ms']:8.1f} ms  p99 {out[name]['p99_ms']:8.1f} ms  "
                f"sql {100 * (out[name]['sql_execute_share'] or 0):3.0f}%  {len(r.content) / 1024:7.1f} KiB")
    return out


def profile_page(url: str, path: str, calls: int = 2) -> dict:
    """cProfile of the page's handler work (the route's `_read` body run inline, so the
    profiler sees it) and the time of each SQL statement it runs."""
    import coordinator.routes.dashboard as routes

    prof = cProfile.Profile()

    async def inline(fn, *args, **kwargs):
        prof.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            prof.disable()

    original = routes.run_in_threadpool
    with app_client(url) as (client, timer, clock):
        client.get(path)  # warm
        routes.run_in_threadpool = inline
        clock.detail = True
        try:
            wall = []
            for _ in range(calls):
                client.get(path)
                wall.append(timer.last * 1000)
        finally:
            routes.run_in_threadpool = original
            clock.detail = False
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(25)
    funcs = buf.getvalue()
    stats = pstats.Stats(prof)
    own = sorted(((v[2], f"{Path(k[0]).name}:{k[1]}({k[2]})", v[1]) for k, v in stats.stats.items()), reverse=True)[:12]
    stmts = sorted(((sum(v) / calls * 1000, len(v) // calls, s) for s, v in clock.by_stmt.items()), reverse=True)[:8]
    log(f"profile of {path} ({calls} calls, server ms {[round(w, 1) for w in wall]}):")
    print(funcs, file=sys.stderr)
    log("functions by own time (s over the calls, calls):")
    for t, name, n in own:
        log(f"  {t:8.3f}  {n:8d}  {name}")
    log("SQL statements by time per page (ms, executions per page):")
    for ms, n, s in stmts:
        log(f"  {ms:8.1f}  {n:4d}  {s[:300]}")
    return {"path": path, "server_ms": [round(w, 1) for w in wall],
            "top_own_time": [{"s": round(t / calls, 4), "calls": n // calls, "function": f} for t, f, n in own[:8]],
            "top_sql": [{"ms": round(ms, 2), "per_page": n, "sql": s[:400]} for ms, n, s in stmts[:5]]}


# ---------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="< 60 s: 3 days of history, fewer rows and rounds")
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--days", type=float, help="history window (default 30; --quick 3)")
    ap.add_argument("--rounds", type=int, help="timed rounds per page (default 30; --quick 10)")
    ap.add_argument("--sample-nodes", type=int, help="nodes with the whole window of node history (default 20; quick 8)")
    ap.add_argument("--recent-hours", type=float, help="node history of every other node (default 24; quick 2)")
    ap.add_argument("--requests", type=int, help="InferenceRequest rows (default 200,000; quick 20,000)")
    ap.add_argument("--profile", action="store_true", help="profile the slowest page even within the target")
    ap.add_argument("--analyze", action="store_true",
                    help="run ANALYZE on both databases first (the coordinator never does; its planner works without "
                         "statistics)")
    ap.add_argument("--keep", help="build the databases in this directory and keep them")
    ap.add_argument("--seed", type=int, default=14)
    a = ap.parse_args()
    q = a.quick
    days = a.days if a.days is not None else (3.0 if q else 30.0)
    rounds = a.rounds or (10 if q else 30)
    sample_n = a.sample_nodes if a.sample_nodes is not None else (8 if q else 20)
    recent_h = a.recent_hours if a.recent_hours is not None else (2.0 if q else 24.0)
    n_requests = a.requests if a.requests is not None else (20_000 if q else 200_000)
    rng = random.Random(a.seed)
    t_start = time.monotonic()

    from coordinator.migrate import upgrade

    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="agora-dashboard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        db = work / "agora.db"
        base_db = work / "baseline" / "agora.db"
        for p in (db, base_db):
            for suffix in ("", "-wal", "-shm"):
                Path(str(p) + suffix).unlink(missing_ok=True)
        url = f"sqlite:///{db}"
        upgrade(url)
        log(f"migrated {db}; {a.nodes} nodes, {n_requests:,} requests, {days:g} days of history"
            f"{' (QUICK: a smaller history than the target)' if q else ''}")
        engine, by_model, buyer, others = build_market(url, a.nodes, rng)
        t = time.monotonic()
        n_req = insert_requests(engine, by_model, buyer, others, n_requests, 0.1, days, rng)
        log(f"{n_req:,} requests in {time.monotonic() - t:.1f} s")
        engine.dispose()
        base_db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(db, base_db)  # the baseline: same nodes and requests, no per-minute history
        engine = __import__("coordinator.db", fromlist=["make_engine"]).make_engine(url)
        t = time.monotonic()
        n_mm = insert_market_minutes(engine, by_model, days, rng)
        log(f"{n_mm:,} market minutes ({len(MODELS)} models x {int(days * 1440):,}) in {time.monotonic() - t:.1f} s")
        all_ids = [i for ids in by_model.values() for i in ids]
        sample = set(by_model["tiny"][:max(1, sample_n // 2)]) | set(rng.sample(all_ids, max(0, sample_n - sample_n // 2)))
        t = time.monotonic()
        n_nm = insert_node_minutes(engine, by_model, sample, days, recent_h, rng)
        log(f"{n_nm:,} node minutes ({len(sample)} nodes x {days:g} days, {a.nodes - len(sample)} x {recent_h:g} h) "
            f"in {time.monotonic() - t:.1f} s")
        engine.dispose()
        if a.analyze:  # planner statistics, as `PRAGMA optimize` would gather; the coordinator runs neither
            import sqlite3

            for p in (db, base_db):
                with sqlite3.connect(p) as c:
                    c.execute("ANALYZE")
            log("ANALYZE run on both databases")
        node = by_model["tiny"][0]  # has the whole window of node history
        pages = {
            "market-6h": "/dashboard?window=6h", "market-24h": "/dashboard?window=24h",
            "market-30d": "/dashboard?window=30d", "nodes": "/dashboard/nodes",
            "node-30d": f"/dashboard/nodes/{node}?window=30d", "coach": f"/dashboard/coach?node={node}",
            "usage": f"/dashboard/usage?account={buyer}", "dashboard.json": "/dashboard.json",
        }
        from coordinator.app import tune_gc

        tune_gc()  # what `agora serve` and `agora up` do before serving
        log(f"built in {time.monotonic() - t_start:.1f} s; timing {len(pages)} pages x {rounds} rounds (+2 warm-up)")
        base = measure(f"sqlite:///{base_db}", pages, rounds, 2, "baseline")
        full = measure(url, pages, rounds, 2, "history")
        worst = max(full, key=lambda k: full[k]["p99_ms"])
        p99 = full[worst]["p99_ms"]
        base_p99 = max(v["p99_ms"] for v in base.values())
        result_pages = {k: {**full[k], "baseline_p50_ms": base[k]["p50_ms"], "baseline_p99_ms": base[k]["p99_ms"]}
                        for k in pages}
        prof = None
        slow = [k for k in pages if full[k]["p99_ms"] > TARGET_MS]
        if slow or a.profile:
            prof = [profile_page(url, pages[k]) for k in (slow or [worst])]
        result = {
            "p99_page_ms": p99, "worst_page": worst, "p50_page_ms": max(v["p50_ms"] for v in full.values()),
            "target_ms": TARGET_MS, "met": p99 <= TARGET_MS,
            "history_rows": n_mm + n_nm, "market_minute_rows": n_mm, "node_minute_rows": n_nm,
            "node_history": f"{len(sample)} nodes x {days:g} days + {a.nodes - len(sample)} nodes x {recent_h:g} h",
            "request_rows": n_req, "nodes": a.nodes, "models": len(MODELS), "days": days,
            "pages": result_pages, "baseline_p99_page_ms": base_p99,
            "history_cost_ratio": round(p99 / base_p99, 2) if base_p99 else None,
            "rounds": rounds, "quick": q, "analyzed": a.analyze, "seconds": round(time.monotonic() - t_start, 1),
            "database": "sqlite (embedded default)",
        }
        if prof:
            result["profile"] = prof
        log(f"worst page {worst}: p99 {p99:.1f} ms (target {TARGET_MS:.0f} ms: {'met' if p99 <= TARGET_MS else 'MISSED'}); "
            f"history cost ratio {result['history_cost_ratio']}; {time.monotonic() - t_start:.1f} s in all")
        emit("dashboard", result)
        return 0
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
