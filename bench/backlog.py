"""What an audit backlog costs the hot path (issue 13): the embedded market of
`bench/overhead.py` (one node in front of a minimal upstream) measured without a backlog,
then with N pending audits that no verifier can take (a market of one operator: the case
that used to starve it), then without it again (the baseline is the mean of the two runs
around it), in one run.

Figures: serial added TTFT p50 and 32-concurrent streamed req/s, each with and without the
backlog; `hot_path_cost` = 1 - rps(backlog) / rps(none) (target <= 0.10). The sweep runs
every second (AGORA_SWEEP_INTERVAL_S=1) so that it has many chances to get in the way.

    .venv/bin/python bench/backlog.py --quick    # < 1 minute: 2,000 audits
    .venv/bin/python bench/backlog.py            # 10,000 audits
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import overhead as ov  # noqa: E402
from overhead_procs import Procs, free_port, upstream_argv, wait_for  # noqa: E402
from results import emit  # noqa: E402


def seed_backlog(db: Path, n: int, node_id: str) -> None:
    """N finished requests of the bench's model, each with a pending audit of its node."""
    from sqlmodel import Session

    from coordinator.db import make_engine
    from coordinator.models import Audit, InferenceRequest, RequestStatus

    engine = make_engine(f"sqlite:///{db}")
    with Session(engine) as s:
        account_id = s.exec(__import__("sqlmodel").select(InferenceRequest.account_id).limit(1)).first()
        for i in range(0, n, 1000):
            rids = ["req_bl_" + uuid.uuid4().hex[:20] for _ in range(min(1000, n - i))]
            s.add_all([InferenceRequest(id=rid, account_id=account_id, model=ov.MODEL, kind="chat",
                                        status=RequestStatus.COMPLETED, payload={"sampling": {}}, routing={},
                                        prompt_tokens_est=8, max_tokens=16, hold_amount=0, node_id=node_id)
                       for rid in rids])
            s.flush()
            s.add_all([Audit(request_id=rid, node_id=node_id, claimed={"ids": [1], "logprobs_q": [0]}) for rid in rids])
            s.commit()
    engine.dispose()


async def measure(t: ov.Target, rounds: int, seconds: float) -> dict:
    ser = ov.serial_figures(await ov.serial([t], rounds, 3, 16))[t.name]
    conc = await ov.load(t, 32, True, seconds, 1.0, 16)
    return {"ttft_p50_ms": ser["ttft_p50"], "rps_c32_stream": conc["rps"], "errors": ser["errors"] + conc["errors"]}


async def main_async(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="agora-backlog-"))
    procs = Procs(work / "logs")
    up_port = free_port()
    procs.spawn("upstream", upstream_argv(up_port, ov.MODEL))
    try:
        wait_for(lambda: __import__("httpx").get(f"http://127.0.0.1:{up_port}/v1/models", timeout=1).status_code == 200,
                 "the upstream", 30, procs)
        env = ov.agora_env(work / "home", AGORA_SWEEP_INTERVAL_S="1")
        t = await asyncio.to_thread(ov.start_market, procs, "agora", env, f"http://127.0.0.1:{up_port}/v1", False)
        db = work / "home" / "agora.db"
        import sqlite3

        node_id = sqlite3.connect(db).execute("SELECT id FROM nodes LIMIT 1").fetchone()[0]
        base = [await measure(t, args.rounds, args.seconds)]
        t0 = time.perf_counter()
        await asyncio.to_thread(seed_backlog, db, args.audits, node_id)
        print(f"seeded {args.audits} pending audits in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        await asyncio.sleep(2.5)  # a few sweeps over the backlog
        with_backlog = [await measure(t, args.rounds, args.seconds)]
        con = sqlite3.connect(db)
        pending = con.execute("SELECT COUNT(*) FROM audits WHERE status IN ('PENDING', 'pending')").fetchone()[0]
        con.execute("DELETE FROM audits WHERE request_id LIKE 'req_bl_%'")  # the backlog gone: measure again
        con.commit()
        base.append(await measure(t, args.rounds, args.seconds))
    finally:
        procs.stop()
    w = with_backlog[0]
    b = {k: (base[0][k] + base[1][k]) / 2 for k in ("ttft_p50_ms", "rps_c32_stream")}  # before and after it
    b["errors"] = base[0]["errors"] + base[1]["errors"]
    return {"audits": args.audits, "audits_still_pending": pending, "ttft_p50_ms_none": b["ttft_p50_ms"],
            "ttft_p50_ms_backlog": w["ttft_p50_ms"], "rps_c32_stream_none": round(b["rps_c32_stream"], 1),
            "rps_c32_stream_backlog": round(w["rps_c32_stream"], 1),
            "hot_path_cost": round(1 - w["rps_c32_stream"] / b["rps_c32_stream"], 3),
            "errors": b["errors"] + w["errors"], "quick": args.quick}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--audits", type=int)
    args = ap.parse_args()
    args.audits = args.audits or (2000 if args.quick else 10_000)
    args.rounds, args.seconds = (15, 4.0) if args.quick else (60, 8.0)
    out = asyncio.run(main_async(args))
    print(f"audit backlog {out['audits']}: TTFT p50 {out['ttft_p50_ms_none']} -> {out['ttft_p50_ms_backlog']} ms, "
          f"32-stream req/s {out['rps_c32_stream_none']} -> {out['rps_c32_stream_backlog']} "
          f"(hot-path cost {out['hot_path_cost']:.1%})", file=sys.stderr)
    emit("backlog", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
