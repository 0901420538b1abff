"""A buyer's usage: spend by model and day, cost per request, tokens, latency, and the nodes
that served it — its own requests only (the caller passes its account id). Grouped in SQL;
latency percentiles over the buyer's last `TTFT_SAMPLE` completed requests. Answers served
from the response cache (`response_cache.py`) are counted apart (`cached_*`): their tokens
were made once, by the request they repeat, and their spend is the cache price."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
from sqlalchemy import case, func
from sqlmodel import Session, col, select

from coordinator.history import epoch
from coordinator.models import InferenceRequest, Node, RequestStatus
from coordinator.models.account import utcnow
from pricing.money import NANO_PER_USD

TTFT_SAMPLE = 500


def _aware(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def _int(v) -> int:
    return int(v or 0)


def usage(session: Session, account_id: str, days: float = 30.0, recent: int = 20) -> dict:
    since = utcnow() - timedelta(days=days)
    R = InferenceRequest
    mine = (R.account_id == account_id, col(R.created_at) >= since)
    hit = R.cached == True  # noqa: E712  (SQL)
    done = (R.status == RequestStatus.COMPLETED) & (R.cached == False)  # noqa: E712  (by a node)
    ttfts: dict[str, list[float]] = {}
    for model, created, first in session.exec(select(R.model, R.created_at, R.first_token_at).where(
            *mine, done, col(R.first_token_at).is_not(None)).order_by(col(R.created_at).desc()).limit(TTFT_SAMPLE)):
        ttfts.setdefault(model, []).append((_aware(first) - _aware(created)).total_seconds() * 1000)
    models = []
    for model, n, n_done, p_tok, c_tok, spend, n_hit, hit_c_tok, hit_spend in session.exec(
            select(R.model, func.count(), func.sum(case((done, 1), else_=0)),
                   func.sum(case((done, R.prompt_tokens), else_=0)), func.sum(case((done, R.completion_tokens), else_=0)),
                   func.sum(R.cost), func.sum(case((hit, 1), else_=0)),
                   func.sum(case((hit, R.completion_tokens), else_=0)), func.sum(case((hit, R.cost), else_=0)))
            .where(*mine).group_by(R.model).order_by(R.model)).all():
        ttft = ttfts.get(model, [])
        models.append({"model": model, "requests": n, "completed": _int(n_done), "prompt_tokens": _int(p_tok),
                       "completion_tokens": _int(c_tok), "spend_nano_usd": _int(spend),
                       "cached_requests": _int(n_hit), "cached_completion_tokens": _int(hit_c_tok),
                       "cached_spend_nano_usd": _int(hit_spend),
                       "spend_usd": _int(spend) / NANO_PER_USD, "cost_per_request_usd": _int(spend) / NANO_PER_USD / n,
                       "ttft_p50_ms": float(np.percentile(ttft, 50)) if ttft else None,
                       "ttft_p90_ms": float(np.percentile(ttft, 90)) if ttft else None})
    day = (epoch(session, R.created_at) // 86400).label("day")
    by_day = [{"day": datetime.fromtimestamp(int(d) * 86400, timezone.utc).date().isoformat(), "model": m,
               "spend_usd": _int(v) / NANO_PER_USD}
              for d, m, v in session.exec(select(day, R.model, func.sum(R.cost)).where(*mine)
                                          .group_by(day, R.model).order_by(day, R.model)).all()]
    per_node = session.exec(select(R.node_id, func.count(), func.sum(case((done, R.completion_tokens), else_=0)),
                                   func.sum(R.cost)).where(*mine, col(R.node_id).is_not(None))
                            .group_by(R.node_id)).all()
    last = session.exec(select(R.id, R.model, R.status, R.created_at, R.first_token_at, R.completion_tokens, R.cost,
                               R.node_id, R.cached).where(*mine).order_by(col(R.created_at).desc()).limit(recent)).all()
    ids = {nid for nid, *_ in per_node} | {r[7] for r in last if r[7]}
    names = {n.id: n.name or n.id[:12] for n in session.exec(select(Node).where(col(Node.id).in_(list(ids)))).all()
             } if ids else {}
    total = sum(m["spend_nano_usd"] for m in models)
    return {
        "account_id": account_id, "days": days, "total_spend_usd": total / NANO_PER_USD,
        "requests": sum(m["requests"] for m in models), "models": models, "by_day": by_day,
        "cached_requests": sum(m["cached_requests"] for m in models),
        "nodes": sorted(({"node_id": k, "name": names.get(k, k[:12]), "requests": n, "completion_tokens": _int(toks),
                          "spend_nano_usd": _int(cost), "spend_usd": _int(cost) / NANO_PER_USD}
                         for k, n, toks, cost in per_node), key=lambda n: -n["requests"]),
        "recent": [{"id": rid, "model": model, "status": str(getattr(status, "value", status)),
                    "created_at": _aware(created).isoformat(), "completion_tokens": c_tok,
                    "cost_usd": (cost or 0) / NANO_PER_USD, "node": names.get(node_id or "", (node_id or "")[:12]),
                    "ttft_ms": (_aware(first) - _aware(created)).total_seconds() * 1000 if first and created else None,
                    "cached": bool(cached)}
                   for rid, model, status, created, first, c_tok, cost, node_id, cached in last],
    }
