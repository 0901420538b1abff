"""Admission: validate a buyer's request against what the market offers, place the escrow
hold for the worst case, and queue the request for the scheduler — all in one transaction.

The hold covers `prompt_tokens × max price_in + max_tokens × max price_out` over the live
nodes eligible for the request. The prompt's token count is bounded by its UTF-8 byte
count plus a per-message allowance (byte-level tokenizers never emit more tokens than
bytes), so the hold is never short; the node's signed count is settled later.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import timedelta
from dataclasses import dataclass

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from coordinator.errors import BadRequest, Conflict, InsufficientBalance, ModelNotFound, NoCapacity
from coordinator.models import Account, InferenceRequest, Node, NodeOffer
from coordinator.models.account import utcnow
from coordinator.node_registry import is_live
from coordinator.schemas import ChatCompletionRequest, CompletionRequest
from coordinator.settings import CoordinatorSettings
from pricing.ledger import InsufficientFunds, Ledger
from pricing.money import request_cost


@dataclass
class Admitted:
    request: InferenceRequest
    hold_amount: int


HOLD_GRACE_S = 600  # the sweep fails an overdue request (voiding its hold) before the hold expires


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def live_offers(session: Session, model: str, settings: CoordinatorSettings) -> tuple[list[NodeOffer], bool]:
    """(offers of live nodes for `model`, whether any node has ever offered it)."""
    rows = session.exec(
        select(NodeOffer, Node).join(Node, Node.id == NodeOffer.node_id).where(NodeOffer.model == model)
    ).all()
    return [offer for offer, node in rows if is_live(node, settings)], bool(rows)


def body_hash(body: ChatCompletionRequest | CompletionRequest, kind: str) -> str:
    data = body.model_dump(mode="json", exclude={"stream", "stream_options"})
    return hashlib.sha256(json.dumps([kind, data], sort_keys=True).encode()).hexdigest()


def find_keyed(session: Session, account: Account, key: str) -> InferenceRequest | None:
    return session.exec(select(InferenceRequest).where(
        InferenceRequest.account_id == account.id, InferenceRequest.idempotency_key == key)).first()


def admit(
    session: Session,
    account: Account,
    body: ChatCompletionRequest | CompletionRequest,
    kind: str,
    settings: CoordinatorSettings,
    idempotency_key: str | None = None,
    request_id: str | None = None,
) -> Admitted:
    offers, known = live_offers(session, body.model, settings)
    if not known:
        raise ModelNotFound(f"the model {body.model!r} is not offered on this market", param="model")
    if not offers:
        raise NoCapacity(f"no node serving {body.model!r} is online right now; retry shortly")
    prefs = body.routing
    if prefs and prefs.max_price is not None:
        offers = [o for o in offers if o.price_out <= prefs.max_price]
        if not offers:
            raise NoCapacity(
                f"no online node serves {body.model!r} at or below max_price {prefs.max_price} "
                "nano-USD per million output tokens",
                code="no_node_within_max_price",
            )
    max_context = max(o.max_context for o in offers)
    max_tokens = body.requested_max_tokens() or min(settings.default_max_tokens, max_context)
    if max_tokens > max_context:
        raise BadRequest(
            f"max_tokens {max_tokens} exceeds the model's context length {max_context}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    prompt_est = body.prompt_bytes()
    hold_amount = request_cost(
        prompt_est, max_tokens, max(o.price_in for o in offers), max(o.price_out for o in offers)
    )
    rid = request_id or new_request_id()
    payload: dict = {"sampling": body.sampling(max_tokens)}
    if idempotency_key:
        payload["idempotency_hash"] = body_hash(body, kind)
    if isinstance(body, ChatCompletionRequest):
        payload["messages"] = body.plain_messages()
    else:
        payload["prompt"] = body.prompt
    request = InferenceRequest(
        id=rid,
        account_id=account.id,
        model=body.model,
        kind=kind,
        payload=payload,
        routing=prefs.model_dump(exclude_none=True) if prefs else {},
        prompt_tokens_est=prompt_est,
        max_tokens=max_tokens,
        hold_amount=hold_amount,
        idempotency_key=idempotency_key,
    )
    session.add(request)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        raise Conflict("a request with this Idempotency-Key is already in progress",
                       code="idempotency_conflict") from None
    try:
        hold = Ledger(session).create_hold(
            account.ledger_account_id, hold_amount, idempotency_key=f"hold:{rid}", request_ref=rid,
            expires_at=utcnow() + timedelta(seconds=settings.request_ttl_s + HOLD_GRACE_S),
        )
    except InsufficientFunds as exc:
        raise InsufficientBalance(
            f"balance {exc.available} nano-USD is short of the {exc.needed} nano-USD this request "
            f"may cost (max_tokens={max_tokens}); top up or lower max_tokens"
        ) from exc
    request.hold_id = hold.id
    session.add(request)
    return Admitted(request=request, hold_amount=hold_amount)
