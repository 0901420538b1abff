"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Header
from starlette.concurrency import run_in_threadpool

from coordinator import completions
from coordinator.models import Account
from coordinator.routability import precision
from coordinator.routes.deps import current_account, runtime
from coordinator.runtime import Runtime
from coordinator.schemas import ChatCompletionRequest, CompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"])


IdempotencyKey = Header(default=None, alias="Idempotency-Key", max_length=160)
CacheMode = Header(default=None, alias="X-Agora-Cache", max_length=16,
                   description="response cache for this request: use, refresh or skip (default: the account's)")


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, account: Account = Depends(current_account),
                           rt: Runtime = Depends(runtime), idempotency_key: str | None = IdempotencyKey,
                           cache: str | None = CacheMode):
    return await completions.handle(rt, account, body, "chat", idempotency_key, cache)


@router.post("/completions")
async def legacy_completions(body: CompletionRequest, account: Account = Depends(current_account),
                             rt: Runtime = Depends(runtime), idempotency_key: str | None = IdempotencyKey,
                             cache: str | None = CacheMode):
    return await completions.handle(rt, account, body, "completion", idempotency_key, cache)


@router.get("/models")
async def list_models(rt: Runtime = Depends(runtime)):
    """Models on offer: nodes buyers can be routed to now, price range (nano-USD per Mtok)
    and measured tok/s; unverifiable nodes (no token ids or log-probs: never audited) are
    counted apart, and only where the operator routes to them."""

    def _load():  # from the market view: no load of every node per listing (market_view.py)
        known = rt.market.models()
        return known, [c for m in known for c in rt.market.candidates(m, allow_unverified=True)]

    known, routable = await run_in_threadpool(_load)
    models: dict[str, dict] = {m: {"id": m, "object": "model", "created": 0, "owned_by": "agora", "live_nodes": 0,
                                   "unverified_nodes": 0, "_offers": []} for m in known}
    for c in routable:
        m = models[c.offer.model]
        m["live_nodes" if c.offer.verifiable else "unverified_nodes"] += 1
        m["_offers"].append(c.offer)
    data = []
    for m in sorted(models.values(), key=lambda m: m["id"]):
        offers = m.pop("_offers")
        if offers:
            speeds = [o.measured_tokens_per_s or o.tokens_per_s for o in offers]
            m["pricing"] = {
                "unit": "nano-USD per million tokens",
                "prompt": [min(o.price_in for o in offers), max(o.price_in for o in offers)],
                "completion": [min(o.price_out for o in offers), max(o.price_out for o in offers)],
            }
            m["tokens_per_s"] = {"min": min(speeds), "max": max(speeds), "source": "measured, seeded by benchmark"}
            m["context_length"] = max(o.max_context for o in offers)
            m["quantization"] = {q: sum(1 for o in offers if precision(o) == q)  # routable offers per precision
                                 for q in sorted({precision(o) for o in offers})}
        data.append(m)
    return {"object": "list", "data": data}
