"""Per-minute market and node history: written by the sweep, read by the dashboards.

`record(session, settings)` writes every whole minute since the last one recorded (at most
`MAX_CATCH_UP` of them; a coordinator that was down does not backfill days), one
`MarketMinute` per model and one `NodeMinute` per node offer: requests that ended in the
minute (outcomes, tokens, charges, fees, TTFT and inter-token latency percentiles), audits
resolved in it, and the market as it stands when the minute is written (live offers, asks,
measured speed, load). Rows are unique per minute, so two sweeps racing write each minute
once. `prune` drops rows older than `history_days`.
"""

from __future__ import annotations

from collections import defaultdict
import math
from datetime import datetime, timedelta, timezone

import numpy as np
from sqlalchemy import BigInteger, case, cast, delete, func
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from coordinator.models import (Audit, AuditStatus, InferenceRequest, MarketMinute, Node, NodeMinute, NodeOffer,
                                RequestStatus)
from coordinator.models.account import utcnow
from coordinator.node_registry import is_live
from coordinator.routability import routable_of
from coordinator.settings import CoordinatorSettings
from pricing.ledger_models import LedgerTransfer

MAX_CATCH_UP = 10  # minutes written per call at most
SETTLE_S = 5  # a minute is written this long after it ends: requests finishing at its end have committed
ACTIVE = (RequestStatus.ASSIGNED, RequestStatus.RUNNING)


def minute_of(t: datetime) -> datetime:
    t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
    return t.replace(second=0, microsecond=0)


def _aware(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _ipct(values: list[int], q: float) -> int | None:
    return int(round(np.percentile(values, q))) if values else None


def last_recorded(session: Session) -> datetime | None:
    return _aware(session.exec(select(func.max(MarketMinute.minute))).one())


def record(session: Session, settings: CoordinatorSettings, now: datetime | None = None) -> int:
    """Write the whole minutes not yet written; returns how many minutes were written."""
    now = now or utcnow()
    this_minute = minute_of(now - timedelta(seconds=SETTLE_S))
    last = last_recorded(session)
    first = this_minute - timedelta(minutes=1) if last is None else last + timedelta(minutes=1)
    first = max(first, this_minute - timedelta(minutes=MAX_CATCH_UP))
    written = 0
    m = first
    while m < this_minute:
        if _record_minute(session, settings, m):
            written += 1
        m += timedelta(minutes=1)
    return written


def _record_minute(session: Session, settings: CoordinatorSettings, start: datetime) -> bool:
    end = start + timedelta(minutes=1)
    ended = session.exec(select(InferenceRequest).where(
        col(InferenceRequest.finished_at) >= start, col(InferenceRequest.finished_at) < end)).all()
    fees = dict(session.exec(
        select(InferenceRequest.model, func.sum(LedgerTransfer.amount))
        .join(InferenceRequest, col(InferenceRequest.id) == col(LedgerTransfer.request_ref))
        .where(LedgerTransfer.kind == "fee", col(LedgerTransfer.created_at) >= start,
               col(LedgerTransfer.created_at) < end)
        .group_by(InferenceRequest.model)).all())
    audits = session.exec(
        select(InferenceRequest.model, Audit.node_id, Audit.status, func.count())
        .join(InferenceRequest, col(InferenceRequest.id) == col(Audit.request_id))
        .where(col(Audit.resolved_at) >= start, col(Audit.resolved_at) < end,
               col(Audit.status).in_([AuditStatus.PASSED, AuditStatus.FAILED]))
        .group_by(InferenceRequest.model, Audit.node_id, Audit.status)).all()
    active = dict(session.exec(
        select(InferenceRequest.node_id, func.count()).where(col(InferenceRequest.status).in_(ACTIVE))
        .group_by(InferenceRequest.node_id)).all())
    everything = session.exec(select(NodeOffer, Node).join(Node, col(Node.id) == col(NodeOffer.node_id))).all()
    routable = {(c.node.id, c.offer.model) for c in routable_of(session, settings, everything, allow_unverified=True)}
    offers = [(o, n) for o, n in everything if not n.verify_only]

    by_model: dict[str, list[InferenceRequest]] = defaultdict(list)
    by_node: dict[tuple[str, str], list[InferenceRequest]] = defaultdict(list)
    for r in ended:
        by_model[r.model].append(r)
        if r.node_id:
            by_node[(r.node_id, r.model)].append(r)
    audit_counts: dict[tuple[str, str | None], dict[str, int]] = defaultdict(lambda: {"passed": 0, "failed": 0})
    for model, node_id, status, n in audits:
        key = "passed" if status == AuditStatus.PASSED else "failed"
        audit_counts[(model, None)][key] += n
        audit_counts[(model, node_id)][key] += n
    live_by_model: dict[str, list[tuple[NodeOffer, Node]]] = defaultdict(list)
    for o, n in offers:
        if (n.id, o.model) in routable:
            live_by_model[o.model].append((o, n))

    rows: list = []
    for model in sorted(set(by_model) | set(live_by_model) | {m for m, _ in audit_counts}):
        reqs, live = by_model.get(model, []), live_by_model.get(model, [])
        done = [r for r in reqs if r.status == "completed"]
        ttft = [(_aware(r.first_token_at) - _aware(r.created_at)).total_seconds() * 1000
                for r in done if r.first_token_at and r.created_at]
        itl = [(_aware(r.finished_at) - _aware(r.first_token_at)).total_seconds() * 1000 / (r.completion_tokens - 1)
               for r in done if r.first_token_at and r.finished_at and (r.completion_tokens or 0) > 1]
        asks = [o.price_out for o, _ in live]
        speeds = [s for s in (o.measured_tokens_per_s or o.tokens_per_s_b1 or o.tokens_per_s for o, _ in live) if s]
        a = audit_counts.get((model, None), {"passed": 0, "failed": 0})
        rows.append(MarketMinute(
            minute=start, model=model, nodes_live=len(live), capacity=sum(n.max_concurrency for _, n in live),
            active=sum(active.get(n.id, 0) for _, n in live),
            ask_out_p10=_ipct(asks, 10), ask_out_p50=_ipct(asks, 50), ask_out_p90=_ipct(asks, 90),
            ask_in_p50=_ipct([o.price_in for o, _ in live], 50),
            tok_s_p50=_pct(speeds, 50), tok_s_p90=_pct(speeds, 90),
            requests=len(reqs), completed=len(done), failed=sum(r.status == "failed" for r in reqs),
            rejected=sum(r.status == "rejected" for r in reqs),
            cancelled=sum(r.status == RequestStatus.CANCELLED for r in reqs),
            failed_over=sum(1 for r in done if (r.payload or {}).get("failovers")),
            buyer_gone=sum(r.delivery == "buyer_gone" for r in reqs),
            market_fault=sum(r.delivery in ("relay_broken", "unacked") for r in reqs),
            # tokens nodes processed: a response-cache hit repeats tokens counted when first made
            prompt_tokens=sum(r.prompt_tokens or 0 for r in done if not r.cached),
            completion_tokens=sum(r.completion_tokens or 0 for r in done if not r.cached),
            volume=sum(r.cost or 0 for r in reqs), fees=int(fees.get(model) or 0),
            ttft_p50_ms=_pct(ttft, 50), ttft_p90_ms=_pct(ttft, 90), ttft_p99_ms=_pct(ttft, 99),
            itl_p50_ms=_pct(itl, 50), itl_p99_ms=_pct(itl, 99),
            audits_passed=a["passed"], audits_failed=a["failed"]))
    now = utcnow()
    nodes: list[dict] = []  # one row per node offer: inserted in one statement, not as ORM objects
    for o, n in offers:
        reqs = by_node.get((n.id, o.model), [])
        a = audit_counts.get((o.model, n.id), {"passed": 0, "failed": 0})
        online = is_live(n, settings, now)
        if not (online or reqs or a["passed"] or a["failed"]):
            continue  # a node long gone writes nothing
        nodes.append(dict(
            minute=start, node_id=n.id, model=o.model, online=online, routable=(n.id, o.model) in routable,
            price_in=o.price_in, price_out=o.price_out,
            tok_s=o.measured_tokens_per_s or o.tokens_per_s_b1 or o.tokens_per_s, ttft_ms=o.measured_ttft_ms,
            active=active.get(n.id, 0), max_concurrency=n.max_concurrency, requests=len(reqs),
            completed=sum(r.status == "completed" for r in reqs), failed=sum(r.status == "failed" for r in reqs),
            completion_tokens=sum(r.completion_tokens or 0 for r in reqs if r.status == "completed"),
            revenue=sum(r.cost or 0 for r in reqs), audits_passed=a["passed"], audits_failed=a["failed"],
            reputation=n.reputation))
    if not rows:  # an empty market still marks the minute done
        rows.append(MarketMinute(minute=start, model=""))
    try:
        with session.begin_nested():
            session.add_all(rows)
            session.flush()
            if nodes:  # at 10,000 nodes the ORM's unit of work held the GIL for seconds each minute
                session.connection().execute(NodeMinute.__table__.insert(), nodes)
    except IntegrityError:  # another sweep wrote this minute first
        return False
    return True


def prune(session: Session, settings: CoordinatorSettings, now: datetime | None = None) -> int:
    cutoff = (now or utcnow()) - timedelta(days=settings.history_days)
    n = session.exec(delete(MarketMinute).where(col(MarketMinute.minute) < cutoff)).rowcount  # type: ignore[call-overload]
    n += session.exec(delete(NodeMinute).where(col(NodeMinute.minute) < cutoff)).rowcount  # type: ignore[call-overload]
    return n or 0


def epoch(session: Session, column):
    """Seconds since 1970 of a timestamp column, on SQLite and PostgreSQL."""
    if session.get_bind().dialect.name == "sqlite":
        return cast(func.strftime("%s", column), BigInteger)
    return cast(func.extract("epoch", column), BigInteger)


def _step_s(since: datetime, until: datetime, max_points: int) -> int:
    minutes = max(1.0, (until - since).total_seconds() / 60)
    return 60 * max(1, math.ceil(minutes / max_points))


def market_buckets(session: Session, since: datetime, model: str | None = None, *, until: datetime | None = None,
                   max_points: int = 240) -> list[dict]:
    """The per-minute market rows of the window merged into at most `max_points` buckets in
    SQL (a month is 43,200 minutes per model: never loaded row by row). Per bucket: `minute`
    (its start), `minutes` (rows merged), sums of the counts, the lowest p10 / mean median /
    highest p90 ask, TTFT and ITL p50 weighted by completed requests and their highest p99."""
    until = until or utcnow()
    step = _step_s(since, until, max_points)
    t0 = int(since.timestamp())
    M = MarketMinute
    b = ((epoch(session, M.minute) - t0) // step).label("b")  # integer division: a bucket per `step`
    weight = func.sum(case((col(M.ttft_p50_ms).is_not(None), M.completed), else_=0))
    iweight = func.sum(case((col(M.itl_p50_ms).is_not(None), M.completed), else_=0))
    sums = ("requests", "completed", "failed", "rejected", "cancelled", "failed_over", "buyer_gone", "market_fault",
            "prompt_tokens", "completion_tokens", "volume", "fees", "active", "capacity", "audits_passed",
            "audits_failed")
    q = select(b, func.count(), *(func.sum(getattr(M, k)) for k in sums),
               func.min(M.ask_out_p10), func.avg(M.ask_out_p50), func.max(M.ask_out_p90),
               func.sum(M.completed * M.ttft_p50_ms), weight, func.max(M.ttft_p99_ms),
               func.sum(M.completed * M.itl_p50_ms), iweight, func.max(M.itl_p99_ms)
               ).where(col(M.minute) >= since, col(M.minute) <= until, M.model != "")
    if model:
        q = q.where(M.model == model)
    out = []
    for row in session.exec(q.group_by(b).order_by(b)).all():
        d = {"minute": datetime.fromtimestamp(t0 + int(row[0]) * step, timezone.utc), "minutes": int(row[1])}
        d.update({k: int(v or 0) for k, v in zip(sums, row[2:2 + len(sums)])})
        ask10, ask50, ask90, tsum, tw, t99, isum, iw, i99 = row[2 + len(sums):]
        d.update(ask_p10=_num(ask10), ask_p50=_num(ask50), ask_p90=_num(ask90),
                 ttft_p50=float(tsum) / float(tw) if tw else None, ttft_p99=_num(t99),
                 itl_p50=float(isum) / float(iw) if iw else None, itl_p99=_num(i99))
        out.append(d)
    return out


def node_buckets(session: Session, node_id: str, since: datetime, *, until: datetime | None = None,
                 max_points: int = 240) -> list[dict]:
    """One node's per-minute rows merged into at most `max_points` buckets in SQL."""
    until = until or utcnow()
    step = _step_s(since, until, max_points)
    t0 = int(since.timestamp())
    N = NodeMinute
    b = ((epoch(session, N.minute) - t0) // step).label("b")
    rows = session.exec(select(b, func.count(), func.sum(N.requests), func.sum(N.failed), func.sum(N.active),
                               func.sum(N.max_concurrency), func.avg(N.tok_s), func.avg(N.price_out))
                        .where(N.node_id == node_id, col(N.minute) >= since, col(N.minute) <= until)
                        .group_by(b).order_by(b)).all()
    return [{"minute": datetime.fromtimestamp(t0 + int(r[0]) * step, timezone.utc), "minutes": int(r[1]),
             "requests": int(r[2] or 0), "failed": int(r[3] or 0),
             "load": float(r[4] or 0) / float(r[5]) if r[5] else None, "tok_s": _num(r[6]),
             "price_out": _num(r[7])} for r in rows]


def _num(v) -> float | None:
    """A SQL aggregate as a float (PostgreSQL gives Decimal for sums and means of integers)."""
    return None if v is None else float(v)
