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

from coordinator.history import market_buckets
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
    served = {(nid, st): (n, int(toks or 0), int(cost or 0)) for nid, st, n, toks, cost in session.exec(
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
            "verify_only": node.verify_only,
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
    """The series the market page draws, from at most 240 buckets of the per-minute history
    (merged in SQL). Counts are per minute (a bucket's sum over the minutes it holds)."""
    usd = NANO_PER_USD
    rows = market_buckets(session, since, model)

    def per_min(k: str) -> list[float | None]:
        return [r[k] / r["minutes"] for r in rows]

    return {
        "times": [r["minute"] for r in rows],
        "ask_p10": [None if r["ask_p10"] is None else r["ask_p10"] / usd for r in rows],
        "ask_p50": [None if r["ask_p50"] is None else r["ask_p50"] / usd for r in rows],
        "ask_p90": [None if r["ask_p90"] is None else r["ask_p90"] / usd for r in rows],
        # what buyers paid (prompt and completion tokens alike) per million tokens they bought
        "paid_per_mtok": [r["volume"] / (r["prompt_tokens"] + r["completion_tokens"]) * 1e6 / usd
                          if r["prompt_tokens"] + r["completion_tokens"] else None for r in rows],
        "tokens_per_s": [r["completion_tokens"] / (60.0 * r["minutes"]) for r in rows],
        "ttft_p50": [r["ttft_p50"] for r in rows], "ttft_p99": [r["ttft_p99"] for r in rows],
        "itl_p50": [r["itl_p50"] for r in rows], "itl_p99": [r["itl_p99"] for r in rows],
        "utilisation": [r["active"] / r["capacity"] if r["capacity"] else None for r in rows],
        "revenue": [v / usd for v in per_min("volume")], "fees": [v / usd for v in per_min("fees")],
        **{k: per_min(k) for k in ("audits_passed", "audits_failed", "completed", "failed", "rejected", "failed_over",
                                   "cancelled", "buyer_gone", "market_fault")},
    }
