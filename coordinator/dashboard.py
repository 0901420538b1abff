"""The operator's price-performance view: one snapshot of the market from the database.

Per node: price, advertised vs measured speed, price-performance (USD per million output
tokens ÷ measured tok/s), load, latency, reputation, audits, earnings. Per model: volume
and revenue. Plain data; `routes/dashboard.py` renders it (HTML with an inline SVG
scatter of price against measured speed) and serves it as JSON too.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func
from sqlmodel import Session, select

from coordinator.models import Audit, AuditStatus, InferenceRequest, Node, NodeOffer, RequestStatus
from coordinator.models.account import utcnow
from coordinator.node_registry import is_live
from coordinator.settings import CoordinatorSettings
from pricing.ledger import AccountKind, Ledger
from pricing.money import NANO_PER_USD

ACTIVE = (RequestStatus.ASSIGNED, RequestStatus.RUNNING)


def snapshot(session: Session, settings: CoordinatorSettings, window_h: float = 24.0) -> dict:
    since = utcnow() - timedelta(hours=window_h)
    ledger = Ledger(session)
    active = dict(session.exec(select(InferenceRequest.node_id, func.count()).where(
        InferenceRequest.status.in_(ACTIVE)).group_by(InferenceRequest.node_id)).all())  # type: ignore[attr-defined]
    served = {nid: (n, toks or 0, cost or 0) for nid, n, toks, cost in session.exec(
        select(InferenceRequest.node_id, func.count(), func.sum(InferenceRequest.completion_tokens),
               func.sum(InferenceRequest.cost))
        .where(InferenceRequest.status == RequestStatus.COMPLETED, InferenceRequest.finished_at >= since)
        .group_by(InferenceRequest.node_id)).all()}
    nodes = []
    for offer, node in session.exec(select(NodeOffer, Node).join(Node, Node.id == NodeOffer.node_id)).all():
        measured = offer.measured_tokens_per_s or offer.tokens_per_s_b1 or offer.tokens_per_s
        price_out_usd = offer.price_out / NANO_PER_USD
        jobs, tokens, revenue = served.get(node.id, (0, 0, 0))
        nodes.append({
            "id": node.id, "name": node.name or node.id[:12], "region": node.region, "model": offer.model,
            "online": is_live(node, settings), "banned": node.banned,
            "price_in_usd_per_mtok": offer.price_in / NANO_PER_USD, "price_out_usd_per_mtok": price_out_usd,
            "advertised_tokens_per_s": offer.tokens_per_s_b1 or offer.tokens_per_s,
            "measured_tokens_per_s": measured, "claim_ratio": offer.claim_ratio,
            "usd_per_mtok_per_tok_s": price_out_usd / measured if measured else None,
            "active": active.get(node.id, 0), "max_concurrency": node.max_concurrency,
            "utilisation": active.get(node.id, 0) / max(1, node.max_concurrency),
            "ttft_ms": offer.measured_ttft_ms, "rtt_ms": node.rtt_ms, "reputation": node.reputation,
            "audits_passed": node.audits_passed, "audits_failed": node.audits_failed,
            "jobs_window": jobs, "tokens_window": tokens, "revenue_window_usd": revenue / NANO_PER_USD,
            "earnings_usd": ledger.balance(node.earnings_account_id) / NANO_PER_USD,
        })
    counts = dict(session.exec(select(InferenceRequest.status, func.count()).where(
        InferenceRequest.created_at >= since).group_by(InferenceRequest.status)).all())
    failed_audits = session.exec(select(Audit).where(Audit.status == AuditStatus.FAILED)
                                 .order_by(Audit.id.desc()).limit(20)).all()  # type: ignore[union-attr]
    return {
        "window_hours": window_h,
        "nodes": sorted(nodes, key=lambda n: (n["model"], n["usd_per_mtok_per_tok_s"] or 1e18)),
        "requests": {str(getattr(k, "value", k)): v for k, v in counts.items()},
        "tokens_window": sum(n["tokens_window"] for n in nodes),
        "volume_window_usd": sum(n["revenue_window_usd"] for n in nodes),
        "platform_fees_usd": ledger.system_balance(AccountKind.PLATFORM_FEES) / NANO_PER_USD,
        "failed_audits": [{"id": a.id, "node_id": a.node_id, "request_id": a.request_id,
                           "reasons": (a.verdict or {}).get("reasons"), "at": a.resolved_at} for a in failed_audits],
    }
