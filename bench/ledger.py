"""Ledger benchmark: settlements per second, batched path vs the naive path, on
PostgreSQL and SQLite, measured in the same run.

    .venv/bin/python bench/ledger.py [--quick] [--batch 1000]

Each backend gets a fresh database (PostgreSQL: a temporary `agora_bench_<random>`,
dropped at the end; SQLite: a WAL file in a temp folder, set up as the coordinator does).
It seeds buyers, sellers and pending escrow holds sized for the worst case of a request
(200 prompt + 256 max tokens at $0.50 / $1.50 per Mtok), then settles them from receipts
(a random number of delivered tokens, one seller in ten a two-seller failover), 5% fee:

- batched: `pricing.batch.settle_many`, `--batch` holds per transaction;
- naive:   `Ledger.settle_hold` with one transaction (commit) per settlement, the path a
           request handler takes alone (each settlement is 2-4 transfers).

Both run after a warm-up on the same database. On PostgreSQL it also measures the
per-request path under load (16 threads, each request a hold and a settlement in their
own transactions), and the coordinator's settle step over accepted receipts: one request
per transaction (`settle_accepted`) vs the settle task (`DispatchStore.settle`, which pays
its request and the backlog with `settle_many`), one task per request as a worker gets them.
The books are checked afterwards (sum of balances zero, no pending hold, escrow empty). The
last line is one JSON object.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sqlalchemy as sa  # noqa: E402
from sqlalchemy import event, insert  # noqa: E402
from sqlmodel import Session, SQLModel, select  # noqa: E402

from pricing.batch import Settlement, settle_many  # noqa: E402
from pricing.ledger import (  # noqa: E402
    AccountKind, HoldState, Ledger, LedgerAccount, LedgerHold, LedgerTransfer, total_balance,
)
from pricing.ledger_models import _utcnow  # noqa: E402
from pricing.money import request_cost  # noqa: E402
from results import emit  # noqa: E402  (bench/results.py)

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
P_IN, P_OUT = 500_000_000, 1_500_000_000  # nano-USD per Mtok
PROMPT, MAX_TOKENS, FEE_BPS = 200, 256, 500
HOLD = request_cost(PROMPT, MAX_TOKENS, P_IN, P_OUT)


def sqlite_engine(path: str):
    engine = sa.create_engine(f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def seed(engine, n_holds: int, n_buyers: int = 200, n_sellers: int = 20, seed: int = 0):
    """Accounts, deposits and `n_holds` pending holds (bulk-inserted: setup, not measured)."""
    SQLModel.metadata.create_all(engine, tables=[t for n, t in SQLModel.metadata.tables.items()
                                                 if n.startswith("ledger_")])
    rng = random.Random(seed)
    with Session(engine) as s:
        led = Ledger(s)
        buyers = [led.open_account(AccountKind.BUYER, ref=f"acct_{i}").id for i in range(n_buyers)]
        sellers = [led.open_account(AccountKind.SELLER_EARNINGS, ref=f"node_{i}").id for i in range(n_sellers)]
        per_buyer = (n_holds // n_buyers + 1) * HOLD
        for b in buyers:
            led.deposit(b, per_buyer, idempotency_key=f"seed-dep-{b}")
        escrow_of = {b: led._sys(AccountKind.ESCROW, b) for b in buyers}  # the buyer's escrow shard
        s.commit()
        now = _utcnow()
        H, T, A = LedgerHold.__table__, LedgerTransfer.__table__, LedgerAccount.__table__
        hold_rows = [{"id": i + 1, "buyer_account_id": buyers[i % n_buyers], "amount": HOLD,
                      "state": HoldState.PENDING, "request_ref": f"req_{i}", "created_at": now,
                      "posted_amount": 0} for i in range(n_holds)]
        s.execute(insert(H), hold_rows)
        s.execute(insert(T), [{"debit_account_id": h["buyer_account_id"], "credit_account_id": escrow_of[h["buyer_account_id"]],
                               "amount": HOLD, "kind": "hold", "hold_id": h["id"], "request_ref": h["request_ref"],
                               "created_at": now} for h in hold_rows])
        held: dict[int, int] = {}
        for h in hold_rows:
            held[h["buyer_account_id"]] = held.get(h["buyer_account_id"], 0) + HOLD
        s.execute(sa.update(A).where(A.c.id == sa.bindparam("_id")).values(balance=A.c.balance - sa.bindparam("_d")),
                  [{"_id": b, "_d": d} for b, d in held.items()])
        to_escrow: dict[int, int] = {}
        for b, d in held.items():
            to_escrow[escrow_of[b]] = to_escrow.get(escrow_of[b], 0) + d
        s.execute(sa.update(A).where(A.c.id == sa.bindparam("_id")).values(balance=A.c.balance + sa.bindparam("_d")),
                  [{"_id": e, "_d": d} for e, d in to_escrow.items()])
        if engine.dialect.name == "postgresql":
            s.execute(sa.text("SELECT setval(pg_get_serial_sequence('ledger_holds', 'id'), :n)"), {"n": n_holds})
        s.commit()
        assert total_balance(s) == 0
    items = []
    for i in range(n_holds):
        delivered = rng.randint(0, MAX_TOKENS)
        if rng.random() < 0.1 and delivered > 1:  # failover: two sellers split the stream
            cut = rng.randint(1, delivered - 1)
            a, b = rng.sample(sellers, 2)
            parts = [(a, request_cost(PROMPT, cut, P_IN, P_OUT)),
                     (b, request_cost(PROMPT + cut, delivered - cut, 0, P_OUT))]
        else:
            parts = [(rng.choice(sellers), request_cost(PROMPT, delivered, P_IN, P_OUT))]
        items.append(Settlement(i + 1, parts, f"settle:req_{i}"))
    return items


def run_batched(engine, items, batch: int) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(items), batch):
        with Session(engine) as s:
            res = settle_many(s, items[i:i + batch], fee_bps=FEE_BPS)
            s.commit()
        bad = [r for r in res if isinstance(r, Exception)]
        assert not bad, bad[:3]
    return len(items) / (time.perf_counter() - t0)


def run_naive(engine, items) -> float:
    t0 = time.perf_counter()
    for it in items:
        with Session(engine) as s:
            Ledger(s).settle_hold(it.hold_id, it.parts, FEE_BPS, idempotency_key=it.idempotency_key)
            s.commit()
    return len(items) / (time.perf_counter() - t0)


def run_concurrent_requests(engine, threads: int, n: int) -> float:
    """The per-request path under load: `threads` workers, each request a hold (one
    transaction) then its settlement (another), buyers and sellers spread as in production."""
    from concurrent.futures import ThreadPoolExecutor

    with Session(engine) as s:
        led = Ledger(s)
        buyers = [led.open_account(AccountKind.BUYER, ref=f"conc_b{i}").id for i in range(64)]
        sellers = [led.open_account(AccountKind.SELLER_EARNINGS, ref=f"conc_s{i}").id for i in range(32)]
        for b in buyers:
            led.deposit(b, HOLD * n, idempotency_key=f"conc-dep-{b}")
        s.commit()

    def request(i):
        with Session(engine) as s:
            hold = Ledger(s).create_hold(buyers[i % 64], HOLD, idempotency_key=f"conc-h{i}", request_ref=f"c{i}").id
            s.commit()
        with Session(engine) as s:
            Ledger(s).settle_hold(hold, [(sellers[i % 32], HOLD // 2)], FEE_BPS, idempotency_key=f"conc-s{i}")
            s.commit()

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(request, range(threads * 4)))  # warm-up
        t0 = time.perf_counter()
        list(pool.map(request, range(threads * 4, threads * 4 + n)))
    return n / (time.perf_counter() - t0)


def bench_settle_task(url: str, n: int) -> dict:
    """Accepted receipts of 2n requests on a fresh coordinator database; half settled one
    per transaction, half by settle tasks (one per request, sequential, as one worker)."""
    from coordinator.account_service import create_account
    from coordinator.admission import admit
    from coordinator.db import create_all, make_engine
    from coordinator.delivery import Delivery, acknowledge
    from coordinator.models import InferenceRequest, RequestStatus
    from coordinator.node_registry import register
    from coordinator.runtime import Runtime
    from coordinator.schemas import ChatCompletionRequest
    from coordinator.settings import CoordinatorSettings
    from coordinator.settlement import Relayed, accept_receipt, settle_accepted
    from node_agent.identity import Identity
    from protocol import ModelOffer, Receipt, Registration, commitment_of, fresh_stamp
    from scheduler.routing import Decision

    with tempfile.TemporaryDirectory() as home:
        # the node never beats here: admitting 2n requests on a loaded machine can outlast the 20 s timeout
        settings = CoordinatorSettings(home=Path(home), database_url=url, run_worker_in_process=False,
                                       heartbeat_timeout_s=3600.0)
        engine = make_engine(url)
        create_all(engine)
        rt = Runtime(settings, engine=engine)
        try:
            me = Identity.generate()
            reg = Registration(node_id=me.public_key_hex, **fresh_stamp(), region="us-east", max_concurrency=4 * n,
                               models=[ModelOffer(model="tiny", price_in=P_IN, price_out=P_OUT,
                                                  tokens_per_s=100.0)]).sign(me)
            body = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=64)
            with rt.session() as s:
                register(s, reg, settings).channel_connected = True
                buyers = [create_account(s, f"b{i}", HOLD * n)[0] for i in range(16)]
            rids = []
            for i in range(2 * n):
                with rt.session() as s:
                    rids.append(admit(s, s.merge(buyers[i % 16]), body, "chat", settings).request.id)
            rt.store.apply(Decision(assignments={rid: me.public_key_hex for rid in rids}))
            for rid in rids:
                ids, lps = [5, 6, 7], [-100, -200, -300]
                receipt = Receipt(node_id=me.public_key_hex, **fresh_stamp(), request_id=rid, model="tiny",
                                  prompt_tokens=3, completion_tokens=3, commitment=commitment_of(rid, ids, lps),
                                  finish_reason="length").sign(me)
                with rt.session() as s:
                    accept_receipt(s, receipt, me.public_key_hex, Relayed(3, commitment_of(rid, ids, lps)), settings)
                    acknowledge(s, rid, 3, Delivery.COMPLETE)  # the buyer's handler wrote all 3 (settling waits for it)
            single_ids, task_ids = rids[:n], rids[n:]
            t0 = time.perf_counter()
            for rid in single_ids:
                with rt.session() as s:
                    settle_accepted(s, rid, settings)
            single = n / (time.perf_counter() - t0)
            # the single path left nothing behind; the task path now drains task_ids
            t0 = time.perf_counter()
            for rid in task_ids:
                assert rt.store.settle(rid)["settled"]
            task = n / (time.perf_counter() - t0)
            with rt.session() as s:
                done = s.exec(select(InferenceRequest.id).where(
                    InferenceRequest.status == RequestStatus.COMPLETED)).all()
                ok = len(done) == 2 * n and total_balance(s) == 0
        finally:
            rt.stop()
            engine.dispose()
    return {"single": single, "task": task, "ok": ok}


def check_books(engine, n_pending: int) -> bool:
    with Session(engine) as s:
        escrow = Ledger(s).system_balance(AccountKind.ESCROW)
        pending = len(s.exec(select(LedgerHold.id).where(LedgerHold.state == HoldState.PENDING)).all())
        return total_balance(s) == 0 and pending == n_pending and escrow == n_pending * HOLD


def bench_backend(engine, n_batched: int, n_naive: int, batch: int) -> dict:
    warm_b, warm_n = min(batch, 200), 50
    items = seed(engine, warm_b + n_batched + warm_n + n_naive)
    a, b, c = warm_b, warm_b + n_batched, warm_b + n_batched + warm_n
    run_batched(engine, items[:a], batch)  # warm-up
    batched = run_batched(engine, items[a:b], batch)
    run_naive(engine, items[b:c])  # warm-up
    naive = run_naive(engine, items[c:])
    # a redelivered batch replays: nothing moves twice
    run_batched(engine, items[a:a + batch], batch)
    out = {"batched": batched, "naive": naive}
    if engine.dialect.name == "postgresql":
        out["concurrent"] = run_concurrent_requests(engine, threads=16, n=n_naive)
    out["ok"] = check_books(engine, 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--pg-admin", default=PG_ADMIN)
    args = ap.parse_args()
    n_batched, n_naive = (20_000, 1_000) if args.quick else (100_000, 3_000)
    out: dict = {"batch_size": args.batch, "n_batched": n_batched, "n_naive": n_naive, "hold_nano_usd": HOLD,
                 "naive_path": "Ledger.settle_hold, one transaction per settlement"}

    with tempfile.TemporaryDirectory() as tmp:
        engine = sqlite_engine(str(Path(tmp) / "ledger.db"))
        r = bench_backend(engine, n_batched, n_naive, args.batch)
        engine.dispose()
    print(f"sqlite: batched {r['batched']:,.0f}/s, naive {r['naive']:,.0f}/s, books ok={r['ok']}", flush=True)
    out.update(sqlite_settlements_per_s=round(r["batched"]), sqlite_naive_settlements_per_s=round(r["naive"]),
               sqlite_batched_vs_naive=round(r["batched"] / r["naive"], 1), sqlite_books_ok=r["ok"])

    name = f"agora_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(args.pg_admin, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        print(f"postgres: unavailable ({exc.__class__.__name__}); skipped", flush=True)
        out.update(pg_settlements_per_s=None, batched_vs_naive=out["sqlite_batched_vs_naive"])
    else:
        try:
            engine = sa.create_engine(args.pg_admin.rsplit("/", 1)[0] + "/" + name)
            r = bench_backend(engine, n_batched, n_naive, args.batch)
            engine.dispose()
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        print(f"postgres: batched {r['batched']:,.0f}/s, naive {r['naive']:,.0f}/s, books ok={r['ok']}", flush=True)
        print(f"postgres: per-request path, 16 threads: {r['concurrent']:,.0f} requests/s (hold + settle)", flush=True)
        name2 = name + "_coord"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name2}"'))
        try:
            t = bench_settle_task(args.pg_admin.rsplit("/", 1)[0] + "/" + name2, 300 if args.quick else 1500)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name2}" WITH (FORCE)'))
        print(f"postgres: coordinator settle step: {t['single']:,.0f}/s one request per transaction, "
              f"{t['task']:,.0f}/s through settle tasks (batched), books ok={t['ok']}", flush=True)
        out.update(pg_settle_task_per_s=round(t["task"]), pg_settle_single_per_s=round(t["single"]),
                   settle_task_vs_single=round(t["task"] / t["single"], 1), pg_settle_books_ok=t["ok"])
        out.update(pg_settlements_per_s=round(r["batched"]), pg_naive_settlements_per_s=round(r["naive"]),
                   pg_concurrent_requests_per_s=round(r["concurrent"]),
                   batched_vs_naive=round(r["batched"] / r["naive"], 1), pg_books_ok=r["ok"])
    admin.dispose()
    emit("ledger", out)


if __name__ == "__main__":
    main()
