"""Admission: validate a buyer's request against what the market offers, place the escrow
hold for the worst case, and queue the request for the scheduler — all in one transaction.

The hold covers `prompt_tokens × max price_in + max_tokens × max price_out` over the nodes
the request may be routed to (`routability.candidates`, within the buyer's `max_price`); a
buyer who cannot afford that hold is routed among the cheaper nodes whose hold it can
afford (`affordable_prices`), never refused because of one expensive seller. The prompt's token count is bounded by its UTF-8 byte
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
from coordinator.models import Account, InferenceRequest, NodeOffer
from coordinator.models.account import utcnow
from coordinator.market_view import MarketView
from coordinator.routability import candidates, precision
from coordinator.schemas import ChatCompletionRequest, CompletionRequest
from coordinator.settings import CoordinatorSettings
from pricing.ledger import InsufficientFunds, Ledger
from pricing.money import request_cost


@dataclass
class Admitted:
    request: InferenceRequest
    hold_amount: int
    offers: list[NodeOffer] | None = None  # those it may be routed to (for `reprice`)


HOLD_GRACE_S = 600
MAX_BYTES_PER_TOKEN = 64  # no tokenizer makes one token of more bytes: a longer prompt cannot fit  # the sweep fails an overdue request (voiding its hold) before the hold expires


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def live_offers(session: Session, model: str, settings: CoordinatorSettings,
                allow_unverified: bool = False, view: MarketView | None = None) -> tuple[list[NodeOffer], bool]:
    """(offers this request may be routed to, whether any node has ever offered `model`);
    from `view` (in memory, read-only objects) when given, else from the database."""
    if view is not None:
        offers = [c.offer for c in view.candidates(model, allow_unverified=allow_unverified)]
    else:
        offers = [c.offer for c in candidates(session, settings, model, allow_unverified=allow_unverified)]
    known = bool(offers) or (view is not None and view.known(model)) or session.exec(
        select(NodeOffer.id).where(NodeOffer.model == model).limit(1)).first() is not None
    return offers, known


def affordable_prices(offers: list[NodeOffer], prompt_est: int, max_tokens: int, balance: int) -> tuple[int, int]:
    """(max input price, max output price) the escrow hold is computed at: those of every
    offer if the buyer can afford that hold, else of the cheapest offers it can (the request
    is then routed among those only). So no seller's price, however high, turns away a
    buyer whom a cheaper node could serve."""
    top_in, top_out = max(o.price_in for o in offers), max(o.price_out for o in offers)
    if request_cost(prompt_est, max_tokens, top_in, top_out) <= balance:
        return top_in, top_out  # the usual case, without ranking a large fleet's offers
    ranked = sorted(offers, key=lambda o: request_cost(prompt_est, max_tokens, o.price_in, o.price_out))
    hi_in = hi_out = 0
    best = None
    for o in ranked:
        hi_in, hi_out = max(hi_in, o.price_in), max(hi_out, o.price_out)
        if request_cost(prompt_est, max_tokens, hi_in, hi_out) > balance and best is not None:
            break
        best = (hi_in, hi_out)
    return best


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
    replica_id: str | None = None,
    view: MarketView | None = None,
    hold: bool = True,
    optimistic: bool = False,
) -> Admitted:
    """A new request row (QUEUED, in this session) and, with `hold`, its escrow hold.
    `optimistic` (without `hold`): priced for every offer without reading the buyer's
    balance first; the caller's hold then either succeeds, the usual case, or reports the
    balance, and `reprice` narrows the request to the offers it can afford."""
    prefs = body.routing
    # Log-probs come only from nodes that name their tokens and report them (verifiable offers).
    logprobs = body.wants_logprobs()
    allow_unverified = bool(prefs and prefs.allow_unverified) and not logprobs
    offers, known = live_offers(session, body.model, settings, allow_unverified=allow_unverified, view=view)
    if not known:
        raise ModelNotFound(f"the model {body.model!r} is not offered on this market", param="model")
    if not offers:
        raise NoCapacity(f"no node serving {body.model!r}{' that reports per-token log-probs' if logprobs else ''} "
                         "can take work right now; retry shortly")
    if prefs and prefs.quantization is not None:
        offers = [o for o in offers if precision(o) in prefs.quantization]
        if not offers:
            raise BadRequest(f"no node serves {body.model!r} at a weight precision in {prefs.quantization} right now",
                             param="routing.quantization", code="no_node_with_quantization")
    if prefs and prefs.max_price is not None:
        offers = [o for o in offers if o.price_out <= prefs.max_price]
        if not offers:
            raise BadRequest(
                f"no node serves {body.model!r} at or below max_price {prefs.max_price} "
                "nano-USD per million output tokens",
                param="routing.max_price", code="no_node_within_max_price",
            )
    prompt_est = body.prompt_bytes()
    max_context = max(o.max_context for o in offers)
    if prompt_est > max_context * MAX_BYTES_PER_TOKEN:
        raise BadRequest(f"the prompt ({prompt_est} bytes) cannot fit the model's context of {max_context} "
                         "tokens", param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                         code="context_length_exceeded")
    requested = body.requested_max_tokens()
    # Without max_tokens: the context left after the prompt (its UTF-8 bytes bound its tokens
    # from above), or the old default where a long prompt leaves that bound no room.
    max_tokens = requested or max(min(settings.default_max_tokens, max_context), max_context - prompt_est)
    if max_tokens > max_context:
        raise BadRequest(
            f"max_tokens {max_tokens} exceeds the model's context length {max_context}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if optimistic and not hold:
        price_in, price_out = max(o.price_in for o in offers), max(o.price_out for o in offers)
    else:
        balance = Ledger(session).balance(account.ledger_account_id)
        price_in, price_out = affordable_prices(offers, prompt_est, max_tokens, balance)
    hold_amount = request_cost(prompt_est, max_tokens, price_in, price_out)
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
        routing=_routing(prefs, allow_unverified, price_in, price_out),
        prompt_tokens_est=prompt_est,
        max_tokens=max_tokens,
        hold_amount=hold_amount,
        idempotency_key=idempotency_key,
        replica_id=replica_id,
        buyer_user=body.user,
        buyer_metadata=body.metadata,
    )
    session.add(request)
    if idempotency_key:  # the key's unique index may refuse the row: only then a savepoint
        try:
            with session.begin_nested():
                session.flush()
        except IntegrityError:
            raise Conflict("a request with this Idempotency-Key is already in progress",
                           code="idempotency_conflict") from None
    if hold:
        place_hold(session, account, request, settings)
    return Admitted(request=request, hold_amount=hold_amount, offers=offers)


def _routing(prefs, allow_unverified: bool, price_in: int, price_out: int) -> dict:
    return {**(prefs.model_dump(exclude_none=True) if prefs else {}), "allow_unverified": allow_unverified,
            # the hold covers these prices: the request goes only to nodes within them
            "max_price": min(price_out, prefs.max_price if prefs and prefs.max_price is not None else price_out),
            "max_price_in": price_in}


def reprice(request: InferenceRequest, offers: list[NodeOffer], balance: int) -> bool:
    """Narrow an `optimistic` request whose hold `balance` could not cover to the cheaper
    offers it can (`affordable_prices`); False if nothing changes (the buyer cannot afford
    even the cheapest: the hold's refusal stands)."""
    price_in, price_out = affordable_prices(offers, request.prompt_tokens_est, request.max_tokens, balance)
    amount = request_cost(request.prompt_tokens_est, request.max_tokens, price_in, price_out)
    if amount >= request.hold_amount:
        return False
    prefs = request.routing
    request.routing = {**prefs, "max_price": min(price_out, prefs["max_price"]), "max_price_in": price_in}
    request.hold_amount = amount
    return True


def place_hold(session: Session, account: Account, request: InferenceRequest, settings: CoordinatorSettings) -> None:
    """The escrow hold of an admitted `request`, in the caller's transaction. It locks the
    buyer's ledger row until that transaction ends: callers that do more work in it do that
    work first (`completions.handle` routes before it holds)."""
    try:  # the request row is new in this transaction: it makes the hold once (Ledger.hold_for_new_request)
        hold_id = Ledger(session).hold_for_new_request(
            account.ledger_account_id, request.hold_amount, request.id,
            expires_at=utcnow() + timedelta(seconds=settings.request_ttl_s + HOLD_GRACE_S),
        )
    except InsufficientFunds as exc:
        raise InsufficientBalance(
            f"balance {exc.available} nano-USD is short of the {exc.needed} nano-USD this request "
            f"may cost (max_tokens={request.max_tokens}); top up or lower max_tokens"
        ) from exc
    request.hold_id = hold_id
    session.add(request)
