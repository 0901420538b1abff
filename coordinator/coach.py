"""The seller coach: for one node, per model it sells — its rank in tokens per dollar at the
median latency target, how often it wins work at its price, what it lost to failed audits,
backoff and errors, and a suggested price with its reason and expected utilisation
(`pricing.coach`). Read from the live offers, the per-minute history and the ledger."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from coordinator.models import InferenceRequest, MarketMinute, Node, NodeMinute, NodeOffer
from coordinator.models.account import utcnow
from coordinator.routability import candidates, why_not_routable
from coordinator.settings import CoordinatorSettings
from pricing.coach import Seat, rank, suggest
from pricing.ledger import AccountKind
from pricing.ledger_models import LedgerAccount, LedgerTransfer
from pricing.money import NANO_PER_USD
from pricing.stake import bonded_by_ref

DEFAULT_OUT_TOKENS = 128


def _seat(offer: NodeOffer, node: Node) -> Seat:
    return Seat(key=node.id, price_out=offer.price_out,
                tok_s=offer.measured_tokens_per_s or offer.tokens_per_s_b1 or offer.tokens_per_s or 1.0,
                max_concurrency=node.max_concurrency, ttft_ms=offer.measured_ttft_ms or offer.ttft_ms)


def _demand(session: Session, model: str, since, minutes: float) -> tuple[float, int]:
    """(completion tokens per minute bought, typical answer length) over the window."""
    toks, done = session.exec(select(func.coalesce(func.sum(MarketMinute.completion_tokens), 0),
                                     func.coalesce(func.sum(MarketMinute.completed), 0))
                              .where(MarketMinute.model == model, col(MarketMinute.minute) >= since)).one()
    if not done:  # no history written yet: the raw requests of the window
        toks, done = session.exec(select(func.coalesce(func.sum(InferenceRequest.completion_tokens), 0), func.count())
                                  .where(InferenceRequest.model == model, InferenceRequest.status == "completed",
                                         col(InferenceRequest.finished_at) >= since)).one()
    return float(toks) / minutes, int(toks / done) if done else DEFAULT_OUT_TOKENS


def _win_rate(session: Session, node_id: str, model: str, since) -> dict:
    """Of the requests for the model that ended in minutes when this node was routable, the
    share it served; and the share of those minutes it was routable at all."""
    mine = session.exec(select(NodeMinute.minute, NodeMinute.requests, NodeMinute.routable, NodeMinute.online).where(
        NodeMinute.node_id == node_id, NodeMinute.model == model, col(NodeMinute.minute) >= since)).all()
    routable_minutes = [m for m, _, r, _ in mine if r]
    market = dict(session.exec(select(MarketMinute.minute, MarketMinute.requests).where(
        MarketMinute.model == model, col(MarketMinute.minute).in_(routable_minutes))).all()) if routable_minutes else {}
    won = sum(n for m, n, r, _ in mine if r)
    total = sum(market.values())
    online = [m for m, _, _, o in mine if o]
    return {"win_rate": won / total if total else None, "requests_won": won, "requests_in_market": total,
            "minutes_online": len(online), "minutes_routable": len(routable_minutes),
            "minutes_backing_off": len([1 for _, _, r, o in mine if o and not r])}


def _losses(session: Session, node: Node, since) -> dict:
    stake_acct = session.exec(select(LedgerAccount.id).where(  # read only: no account is opened here
        LedgerAccount.kind == AccountKind.SELLER_STAKE, LedgerAccount.ref == f"node:{node.id}")).first()
    rows = dict(session.exec(select(LedgerTransfer.kind, func.sum(LedgerTransfer.amount)).where(
        col(LedgerTransfer.debit_account_id).in_([node.earnings_account_id, stake_acct or -1]),
        col(LedgerTransfer.kind).in_(["clawback", "slash"]), col(LedgerTransfer.created_at) >= since)
        .group_by(LedgerTransfer.kind)).all())
    earned = session.exec(select(func.coalesce(func.sum(LedgerTransfer.amount), 0)).where(
        LedgerTransfer.credit_account_id == node.earnings_account_id, LedgerTransfer.kind == "earning",
        col(LedgerTransfer.created_at) >= since)).one()
    failed = session.exec(select(func.count()).select_from(InferenceRequest).where(
        InferenceRequest.node_id == node.id, InferenceRequest.status == "failed",
        col(InferenceRequest.finished_at) >= since)).one()
    done = session.exec(select(func.count(), func.coalesce(func.sum(InferenceRequest.cost), 0)).where(
        InferenceRequest.node_id == node.id, InferenceRequest.status == "completed",
        col(InferenceRequest.finished_at) >= since)).one()
    per_job = int(done[1]) / done[0] if done[0] else 0  # PostgreSQL sums a BIGINT as a Decimal
    return {"earned_nano_usd": int(earned), "clawed_back_nano_usd": int(rows.get("clawback") or 0),
            "slashed_nano_usd": int(rows.get("slash") or 0), "failed_jobs": int(failed),
            "errors_lost_nano_usd": int(failed * per_job), "error_rate": node.error_rate,
            "consecutive_failures": node.failures}


def coach(session: Session, settings: CoordinatorSettings, node_id: str, window_h: float = 1.0) -> dict:
    node = session.get(Node, node_id)
    if node is None:
        raise LookupError(node_id)
    since = utcnow() - timedelta(hours=window_h)
    minutes = window_h * 60
    bonded = bonded_by_ref(session, [f"node:{node.id}"]).get(f"node:{node.id}") if settings.min_stake else None
    losses = _losses(session, node, since)
    models = []
    for offer in session.exec(select(NodeOffer).where(NodeOffer.node_id == node.id)).all():
        me = _seat(offer, node)
        others = [_seat(c.offer, c.node) for c in candidates(session, settings, offer.model, allow_unverified=True)
                  if c.node.id != node.id]
        demand, out_tokens = _demand(session, offer.model, since, minutes)
        r = rank(me, others, out_tokens)
        s = suggest(me, others, demand)
        wins = _win_rate(session, node.id, offer.model, since)
        backoff_lost = 0
        if wins["minutes_routable"] and wins["minutes_backing_off"]:
            backoff_lost = int(losses["earned_nano_usd"] / wins["minutes_routable"] * wins["minutes_backing_off"])
        models.append({
            "model": offer.model, "price_out_usd_per_mtok": offer.price_out / NANO_PER_USD,
            "tokens_per_usd": me.tokens_per_usd if me.price_out > 0 else None, "measured_tokens_per_s": me.tok_s,
            "rank": r.position, "rank_of": r.of, "latency_target_ms": r.target_ms,
            "typical_answer_tokens": out_tokens, "competitors": len(others),
            "demand_tokens_per_min": demand, **wins, "backoff_lost_nano_usd": backoff_lost,
            "suggestion": {**asdict(s), "price_out_usd_per_mtok": s.price_out / NANO_PER_USD},
        })
    return {"node_id": node.id, "name": node.name or node.id[:12], "window_hours": window_h,
            "routable": why_not_routable(node, None, settings, bonded) is None,
            "not_routable_because": why_not_routable(node, None, settings, bonded),
            "reputation": node.reputation, "audits_passed": node.audits_passed, "audits_failed": node.audits_failed,
            "losses": losses, "models": models}
