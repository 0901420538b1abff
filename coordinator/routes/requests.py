"""A buyer's view of one of their requests: status, tokens, cost, the node that served it."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool

from coordinator.errors import NotFound
from coordinator.models import Account, InferenceRequest
from coordinator.routes.deps import current_account, runtime
from coordinator.runtime import Runtime
from pricing.statement import request_charges

router = APIRouter(prefix="/v1/requests", tags=["requests"])


@router.get("/{request_id}")
async def get_request(request_id: str, account: Account = Depends(current_account), rt: Runtime = Depends(runtime)):
    def _load():
        with rt.read_session() as s:
            req = s.get(InferenceRequest, request_id)
            return req, (request_charges(s, request_id) if req is not None else None)

    req, money = await run_in_threadpool(_load)
    if req is None or req.account_id != account.id:  # someone else's request is not found either
        raise NotFound(f"no request {request_id}")
    segments = req.payload.get("segments", [])
    return {
        "id": req.id, "model": req.model, "status": req.status.value, "node_id": req.node_id,
        "prompt_tokens": req.prompt_tokens, "completion_tokens": req.completion_tokens,
        "max_tokens": req.max_tokens, "hold_nano_usd": req.hold_amount, "cost_nano_usd": req.cost,
        "price_in": req.price_in, "price_out": req.price_out, "finish_reason": req.finish_reason,
        "failovers": req.payload.get("failovers", len(segments)), "error": req.error,
        # the nodes that served it in stream order, after a failover: each one's tokens; a
        # segment whose audit failed before payment is `voided` (not charged)
        "segments": [{"node_id": sg["node_id"], "tokens": sg["tokens"], "voided": bool(sg.get("voided"))}
                     for sg in segments],
        "delivery": req.delivery, "delivered_tokens": req.delivered_tokens,
        "user": req.buyer_user, "metadata": req.buyer_metadata,  # the buyer's own labels, as sent
        # from the ledger's own transfers: what was held, charged and given back
        "ledger": {"held_nano_usd": money.held, "charged_nano_usd": money.charged,
                   "refunded_nano_usd": money.refunded, "pending": money.pending},
        "created_at": req.created_at, "finished_at": req.finished_at,
    }
