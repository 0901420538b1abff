"""The operator's views as plain data: the market now (`snapshot`: every node offer with
claimed vs measured speed, price, tokens per dollar, load, reputation, audits, stake,
earnings, error rate and why it is not routable) and over time (`market_history`: the
per-minute rows, merged per minute across models). `routes/dashboard.py` renders them.

A bounded number of queries whatever the fleet's size (grouped, never one per node).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from coordinator.history import market_series
from coordinator.models import Audit, AuditStatus, InferenceRequest, Node, NodeOffer, RequestStatus
from coordinator.models.account import utcnow
from coordinator.node_registry import is_live
from coordinator.routability import why_not_routable
from coordinator.settings import CoordinatorSettings
from pricing.ledger import AccountKind, Ledger
from pricing.ledger_models import LedgerAccount, LedgerTransfer
from pricing.money import NANO_PER_USD
from pricing.stake import bonded_by_ref

ACTIVE = (RequestStatus.ASSIGNED, RequestStatus.RUNNING)


def snapshot(session: Session, settings: CoordinatorSettings, window_h: float = 24.0) -> dict:
    since = utcnow() - timedelta(hours=window_h)
    ledger = Ledger(session)
    active = dict(session.exec(select(InferenceRequest.node_id, func.count()).where(
        col(InferenceRequest.status).in_(ACTIVE)).group_by(InferenceRequest.node_id)).all())
    served = {(nid, st): (n, toks or 0, cost or 0) for nid, st, n, toks, cost in session.exec(
        select(InferenceRequest.node_id, InferenceRequest.status, func.count(),
               func.sum(InferenceRequest.completion_tokens), func.sum(InferenceRequest.cost))
        .where(col(InferenceRequest.status).in_([RequestStatus.COMPLETED, RequestStatus.FAILED]),
               col(InferenceRequest.finished_at) >= since)
        .group_by(InferenceRequest.node_id, InferenceRequest.status)).all()}
    rows = session.exec(select(NodeOffer, Node).join(Node, col(Node.id) == col(NodeOffer.node_id))).all()
    node_ids = sorted({n.id for _, n in rows})
    stakes = bonded_by_ref(session, [f"node:{i}" for i in node_ids])
    earnings = dict(session.exec(select(LedgerAccount.id, LedgerAccount.balance).where(
        col(LedgerAccount.id).in_([n.earnings_account_id for _, n in rows]))).all()) if rows else {}
    now = utcnow()
    nodes = []
    for offer, node in rows:
        measured = offer.measured_tokens_per_s or offer.tokens_per_s_b1 or offer.tokens_per_s
        price_out_usd = offer.price_out / NANO_PER_USD
        jobs, tokens, revenue = served.get((node.id, RequestStatus.COMPLETED), (0, 0, 0))
        failed = served.get((node.id, RequestStatus.FAILED), (0, 0, 0))[0]
        why = why_not_routable(node, offer, settings, stakes.get(f"node:{node.id}"), now)
        if why is None and not offer.verifiable:
            why = None if settings.allow_unverified_nodes else "cannot be audited (no token ids or log-probs)"
        nodes.append({
            "id": node.id, "name": node.name or node.id[:12], "region": node.region, "engine": node.engine,
            "model": offer.model, "online": is_live(node, settings, now), "banned": node.banned,
            "routable": why is None, "not_routable_because": why,
            "price_in_usd_per_mtok": offer.price_in / NANO_PER_USD, "price_out_usd_per_mtok": price_out_usd,
            "advertised_tokens_per_s": offer.tokens_per_s_b1 or offer.tokens_per_s,
            "measured_tokens_per_s": measured, "claim_ratio": offer.claim_ratio,
            "tokens_per_usd": 1e6 / price_out_usd if price_out_usd > 0 else None,
            "usd_per_mtok_per_tok_s": price_out_usd / measured if measured else None,
            "active": active.get(node.id, 0), "max_concurrency": node.max_concurrency,
            "utilisation": active.get(node.id, 0) / max(1, node.max_concurrency),
            "ttft_ms": offer.measured_ttft_ms, "rtt_ms": node.rtt_ms, "reputation": node.reputation,
            "audits_passed": node.audits_passed, "audits_failed": node.audits_failed,
            "stake_usd": stakes.get(f"node:{node.id}", 0) / NANO_PER_USD,
            "error_rate": node.error_rate, "failed_window": failed,
            "jobs_window": jobs, "tokens_window": tokens, "revenue_window_usd": revenue / NANO_PER_USD,
            "earnings_usd": earnings.get(node.earnings_account_id, 0) / NANO_PER_USD,
        })
    counts = dict(session.exec(select(InferenceRequest.status, func.count()).where(
        col(InferenceRequest.created_at) >= since).group_by(InferenceRequest.status)).all())
    failed_audits = session.exec(select(Audit).where(Audit.status == AuditStatus.FAILED)
                                 .order_by(col(Audit.id).desc()).limit(20)).all()
    slashes = session.exec(select(func.count(), func.coalesce(func.sum(LedgerTransfer.amount), 0)).where(
        LedgerTransfer.kind == "slash", col(LedgerTransfer.created_at) >= since)).one()
    return {
        "window_hours": window_h,
        "nodes": sorted(nodes, key=lambda n: (n["model"], n["usd_per_mtok_per_tok_s"] or 1e18)),
        "requests": {str(getattr(k, "value", k)): v for k, v in counts.items()},
        "tokens_window": sum(n["tokens_window"] for n in nodes),
        "volume_window_usd": sum(n["revenue_window_usd"] for n in nodes),
        "platform_fees_usd": ledger.system_balance(AccountKind.PLATFORM_FEES) / NANO_PER_USD,
        "slashes_window": int(slashes[0]), "slashed_window_usd": int(slashes[1]) / NANO_PER_USD,
        "failed_audits": [{"id": a.id, "node_id": a.node_id, "request_id": a.request_id,
                           "reasons": (a.verdict or {}).get("reasons"), "at": a.resolved_at} for a in failed_audits],
    }


def market_history(session: Session, since: datetime, model: str | None = None) -> dict:
    """Per minute, merged across models (or one model): the series the market page draws."""
    per: dict[datetime, dict] = {}
    for r in market_series(session, since, model):
        m = per.setdefault(r.minute, {"requests": 0, "completed": 0, "failed": 0, "rejected": 0, "failed_over": 0,
                                      "cancelled": 0, "buyer_gone": 0, "market_fault": 0,
                                      "completion_tokens": 0, "volume": 0, "fees": 0, "active": 0, "capacity": 0,
                                      "audits_passed": 0, "audits_failed": 0, "ask": [], "ttft": [], "itl": []})
        for k in ("requests", "completed", "failed", "rejected", "failed_over", "cancelled", "buyer_gone",
                  "market_fault", "completion_tokens", "volume", "fees",
                  "active", "capacity", "audits_passed", "audits_failed"):
            m[k] += getattr(r, k)
        if r.ask_out_p50 is not None:
            m["ask"].append((r.ask_out_p10, r.ask_out_p50, r.ask_out_p90))
        if r.ttft_p50_ms is not None:
            m["ttft"].append((r.completed, r.ttft_p50_ms, r.ttft_p99_ms))
        if r.itl_p50_ms is not None:
            m["itl"].append((r.completed, r.itl_p50_ms, r.itl_p99_ms))
    times = sorted(per)
    usd = NANO_PER_USD

    def worst(xs: list, i: int, how=max):
        return how(x[i] for x in xs) if xs else None

    def weighted(xs: list, i: int):
        w = sum(x[0] for x in xs)
        return sum(x[0] * x[i] for x in xs) / w if xs and w else None

    rows = [per[t] for t in times]
    return {
        "times": times,
        "ask_p10": [worst(m["ask"], 0, min) / usd if m["ask"] else None for m in rows],
        "ask_p50": [sorted(x[1] for x in m["ask"])[len(m["ask"]) // 2] / usd if m["ask"] else None for m in rows],
        "ask_p90": [worst(m["ask"], 2) / usd if m["ask"] else None for m in rows],
        "paid_per_mtok": [m["volume"] / m["completion_tokens"] * 1e6 / usd if m["completion_tokens"] else None
                          for m in rows],
        "tokens_per_s": [m["completion_tokens"] / 60.0 for m in rows],
        "ttft_p50": [weighted(m["ttft"], 1) for m in rows], "ttft_p99": [worst(m["ttft"], 2) for m in rows],
        "itl_p50": [weighted(m["itl"], 1) for m in rows], "itl_p99": [worst(m["itl"], 2) for m in rows],
        "utilisation": [m["active"] / m["capacity"] if m["capacity"] else None for m in rows],
        "revenue": [m["volume"] / usd for m in rows], "fees": [m["fees"] / usd for m in rows],
        "audits_passed": [float(m["audits_passed"]) for m in rows],
        "audits_failed": [float(m["audits_failed"]) for m in rows],
        "completed": [float(m["completed"]) for m in rows], "failed": [float(m["failed"]) for m in rows],
        "rejected": [float(m["rejected"]) for m in rows], "failed_over": [float(m["failed_over"]) for m in rows],
        "cancelled": [float(m["cancelled"]) for m in rows], "buyer_gone": [float(m["buyer_gone"]) for m in rows],
        "market_fault": [float(m["market_fault"]) for m in rows],
    }
