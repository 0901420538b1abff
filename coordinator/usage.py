"""A buyer's usage: spend by model and day, cost per request, tokens, latency, and the nodes
that served it — its own requests only (the caller passes its account id)."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta, timezone

import numpy as np
from sqlmodel import Session, col, select

from coordinator.models import InferenceRequest, Node
from coordinator.models.account import utcnow
from pricing.money import NANO_PER_USD


def _aware(t: datetime | None) -> datetime | None:
    return t.replace(tzinfo=timezone.utc) if t is not None and t.tzinfo is None else t


def usage(session: Session, account_id: str, days: float = 30.0, recent: int = 20) -> dict:
    since = utcnow() - timedelta(days=days)
    R = InferenceRequest
    rows = session.exec(select(R.id, R.model, R.status, R.created_at, R.first_token_at, R.finished_at,
                               R.prompt_tokens, R.completion_tokens, R.cost, R.node_id)
                        .where(R.account_id == account_id, col(R.created_at) >= since)
                        .order_by(col(R.created_at))).all()
    by_model: dict[str, dict] = defaultdict(lambda: {"requests": 0, "completed": 0, "prompt_tokens": 0,
                                                     "completion_tokens": 0, "spend_nano_usd": 0, "ttft_ms": []})
    by_day: dict[tuple[str, str], int] = defaultdict(int)
    nodes: dict[str, dict] = defaultdict(lambda: {"requests": 0, "completion_tokens": 0, "spend_nano_usd": 0})
    for rid, model, status, created, first, finished, p_tok, c_tok, cost, node_id in rows:
        m = by_model[model]
        m["requests"] += 1
        m["spend_nano_usd"] += cost or 0
        if status == "completed":
            m["completed"] += 1
            m["prompt_tokens"] += p_tok or 0
            m["completion_tokens"] += c_tok or 0
            if first and created:
                m["ttft_ms"].append((_aware(first) - _aware(created)).total_seconds() * 1000)
        by_day[(_aware(created).date().isoformat(), model)] += cost or 0
        if node_id:
            n = nodes[node_id]
            n["requests"] += 1
            n["completion_tokens"] += (c_tok or 0) if status == "completed" else 0
            n["spend_nano_usd"] += cost or 0
    names = {n.id: n.name or n.id[:12] for n in session.exec(
        select(Node).where(col(Node.id).in_(list(nodes)))).all()} if nodes else {}
    models = []
    for model, m in sorted(by_model.items()):
        t = m.pop("ttft_ms")
        models.append({"model": model, **m, "spend_usd": m["spend_nano_usd"] / NANO_PER_USD,
                       "cost_per_request_usd": m["spend_nano_usd"] / NANO_PER_USD / m["requests"],
                       "ttft_p50_ms": float(np.percentile(t, 50)) if t else None,
                       "ttft_p90_ms": float(np.percentile(t, 90)) if t else None})
    last = rows[-recent:][::-1]
    return {
        "account_id": account_id, "days": days,
        "total_spend_usd": sum(m["spend_nano_usd"] for m in models) / NANO_PER_USD,
        "requests": len(rows), "models": models,
        "by_day": [{"day": d, "model": mdl, "spend_usd": v / NANO_PER_USD} for (d, mdl), v in sorted(by_day.items())],
        "nodes": sorted(({"node_id": k, "name": names.get(k, k[:12]), **v, "spend_usd": v["spend_nano_usd"] / NANO_PER_USD}
                         for k, v in nodes.items()), key=lambda n: -n["requests"]),
        "recent": [{"id": rid, "model": model, "status": str(getattr(status, "value", status)),
                    "created_at": _aware(created).isoformat(), "completion_tokens": c_tok,
                    "cost_usd": (cost or 0) / NANO_PER_USD, "node": names.get(node_id or "", (node_id or "")[:12]),
                    "ttft_ms": (_aware(first) - _aware(created)).total_seconds() * 1000 if first and created else None}
                   for rid, model, status, created, first, finished, p_tok, c_tok, cost, node_id in last],
    }
