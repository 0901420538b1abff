"""Ending a request: check the node's signed receipt against what was relayed, then pay.

The node is paid for what the coordinator saw: its completion count is the number of
tokens the coordinator relayed, and the receipt's commitment must equal the hash chain
over those relayed tokens — a node cannot claim more tokens or change its story later.
The prompt count is the node's (its tokenizer), capped by the admission estimate. The
buyer is charged for what its handler acknowledged writing to it (`delivery.py`): the
same tokens when nothing broke; fewer when the relay lost some, the platform then paying
the node the difference. Charges are at the prices locked at assignment, never above the
hold; the rest of the hold goes back to the buyer; the node's earnings get its part less
the platform fee.

Two phases, so that a crash never loses or doubles money: the work channel accepts and
stores the receipt with its own measurements (`accept_receipt`, request -> SETTLING); the
buyer's handler acknowledges its delivery (`delivery.acknowledge`); whichever comes second
queues the Celery task `agora.settle`, which pays it (`settle_accepted_batch`, ->
COMPLETED): the task's own request and up to `SETTLE_BATCH - 1` other acknowledged
receipts that no other transaction holds, through the ledger's set-based `settle_many` in
one transaction (`settle_accepted` is the same path for one request). The task is
idempotent (a redelivery returns the first result); the sweep resends it for requests left
SETTLING, and settles as `unacked` those whose acknowledgement never came.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sqlmodel import Session, col, select

from coordinator import speed
from coordinator.delivery import Delivery, Quote, acknowledge, quote_of
from coordinator.models import InferenceRequest, Node, NodeOffer, ReceiptRecord, RequestStatus
from coordinator.models.account import utcnow
from coordinator.node_registry import check_signed, record_success
from coordinator.settings import CoordinatorSettings
from protocol import Receipt
from pricing.batch import Settlement, settle_many
from pricing.errors import LedgerError
from pricing.ledger import Ledger

SETTLE_BATCH = 200  # accepted receipts one settle task pays in one transaction, at most

class ReceiptRejected(Exception):
    """The receipt does not match the request or the relayed tokens; nothing is paid."""


@dataclass
class Settled:
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    cost: int
    finish_reason: str


@dataclass
class Relayed:
    """What the coordinator itself saw of a request's stream."""

    token_count: int
    commitment: str
    seconds: float = 0.0  # first token to last
    ttft_ms: float | None = None  # assignment sent to first token, as the coordinator saw it
    concurrent_streams: int = 1  # the node's streams on this channel when this one ended


@dataclass
class Accepted:
    fresh: bool
    audit_id: int | None = None  # set by the caller that picks the job for an audit
    ready: bool = False  # the buyer's delivery is acknowledged too: settle now
    quote: Quote | None = None  # what the buyer's charge depends on, for its handler


class AwaitingDelivery(ReceiptRejected):
    """The receipt is in but the buyer's handler has not said what it delivered yet."""


def _settled(req: InferenceRequest) -> Settled:
    return Settled(req.id, req.prompt_tokens or 0, req.completion_tokens or 0, req.cost or 0,
                   req.finish_reason or "stop")


def accept_receipt(session: Session, receipt: Receipt, node_id: str, relayed: Relayed,
                   settings: CoordinatorSettings) -> Accepted:
    """Phase 1, on the work channel: check the receipt against what was relayed and store
    it with the coordinator's own measurements; the request moves to SETTLING. `fresh` is
    False if it was already accepted (a resent receipt)."""
    req = session.get(InferenceRequest, receipt.request_id, with_for_update=True)
    if req is None:
        raise ReceiptRejected(f"unknown request {receipt.request_id}")
    if req.status in (RequestStatus.SETTLING, RequestStatus.COMPLETED) and req.node_id == node_id:
        return Accepted(fresh=False)
    if req.node_id != node_id or receipt.node_id != node_id:
        raise ReceiptRejected("receipt is not from the node the request was assigned to")
    if req.status not in (RequestStatus.ASSIGNED, RequestStatus.RUNNING):
        raise ReceiptRejected(f"request is {req.status.value}, not running")
    check_signed(session, receipt, settings)
    if receipt.completion_tokens != relayed.token_count or receipt.commitment != relayed.commitment:
        raise ReceiptRejected(
            f"receipt claims {receipt.completion_tokens} tokens / commitment {receipt.commitment[:8]}…, "
            f"coordinator relayed {relayed.token_count} / {relayed.commitment[:8]}…"
        )
    session.add(ReceiptRecord(
        request_id=req.id, node_id=node_id, prompt_tokens=receipt.prompt_tokens,
        completion_tokens=receipt.completion_tokens, commitment=receipt.commitment,
        finish_reason=receipt.finish_reason, signature=receipt.signature,
        payload={"receipt": receipt.model_dump(mode="json"), "relayed": asdict(relayed)},
    ))
    req.status = RequestStatus.SETTLING
    if req.payload.get("canary") and req.delivery is None:  # the coordinator is its own buyer
        req.delivered_tokens, req.delivery = relayed.token_count, Delivery.COMPLETE.value
    session.add(req)
    quote = quote_of(req, min(receipt.prompt_tokens, req.prompt_tokens_est), relayed.token_count)
    return Accepted(fresh=True, ready=req.delivery is not None, quote=quote)


@dataclass
class _Charge:
    record: ReceiptRecord
    relayed: Relayed
    node: Node
    prompt_tokens: int
    completion_tokens: int  # what the buyer was charged for
    parts: list[tuple[int, int]]  # (earnings account, gross the buyer pays), capped by the hold
    subsidy: list[tuple[int, int]]  # (earnings account, net the platform adds): tokens the market lost


def _charge(session: Session, req: InferenceRequest, fee_bps: int) -> _Charge:
    record = session.get(ReceiptRecord, req.id)
    relayed = Relayed(**record.payload["relayed"])
    node = session.get(Node, record.node_id)
    quote = quote_of(req, min(record.prompt_tokens, req.prompt_tokens_est), relayed.token_count)
    delivery = Delivery(req.delivery)
    delivered = min(req.delivered_tokens or 0, quote.relayed)
    earners = [session.get(Node, seg["node_id"]).earnings_account_id for seg in req.payload.get("segments", [])]
    earners.append(node.earnings_account_id)
    parts = list(zip(earners, quote.buyer_gross(delivered, delivery)))
    subsidy = [(a, n) for a, n in zip(earners, quote.subsidies(delivered, delivery, fee_bps))
               if n > 0]
    prompt = quote.prompt_tokens if delivered or delivery == Delivery.COMPLETE else 0
    return _Charge(record, relayed, node, prompt, delivered, parts, subsidy)


def charged_parts(session: Session, req: InferenceRequest, fee_bps: int) -> list[int]:
    """What the buyer paid for each segment of a COMPLETED request (stream order)."""
    return [gross for _, gross in _charge(session, req, fee_bps).parts]


def _complete(session: Session, req: InferenceRequest, ch: _Charge, offer: NodeOffer | None = None) -> Settled:
    record_success(ch.node)
    req.status = RequestStatus.COMPLETED
    req.prompt_tokens, req.completion_tokens = ch.prompt_tokens, ch.completion_tokens
    req.cost = sum(amount for _, amount in ch.parts)
    req.finish_reason = ch.record.finish_reason
    req.finished_at = utcnow()
    session.add(req)
    session.add(ch.node)
    _learn_speed(session, req, ch.relayed, ch.node.rtt_ms, offer)
    return _settled(req)


def settle_accepted(session: Session, request_id: str, settings: CoordinatorSettings) -> Settled:
    """Phase 2 for one request alone (a batch of one): pay an accepted receipt, raising
    what keeps it unpaid. Idempotent: a request already COMPLETED returns the first result."""
    result = settle_accepted_batch(session, request_id, settings, limit=1)[request_id]
    if isinstance(result, Exception):
        raise result
    return result


def settle_accepted_batch(session: Session, request_id: str, settings: CoordinatorSettings,
                          limit: int = SETTLE_BATCH) -> dict[str, Settled | ReceiptRejected | LedgerError]:
    """Phase 2 for `request_id` and up to `limit - 1` other SETTLING requests, paid with
    one `settle_many`. The task's own request is locked first (waiting for a concurrent
    settler of it); the others are taken only where no other transaction holds them (SKIP
    LOCKED on PostgreSQL), so concurrent tasks split the backlog instead of queueing on it.
    Then the nodes and offers the batch updates are locked in id order, then the ledger
    locks its rows in its own order. Per request: Settled (also for one already
    COMPLETED), or the error that leaves it as it was."""
    out: dict[str, Settled | ReceiptRejected | LedgerError] = {}
    own = session.get(InferenceRequest, request_id, with_for_update=True, populate_existing=True)
    reqs = []
    if own is None:
        out[request_id] = ReceiptRejected(f"unknown request {request_id}")
    elif own.status == RequestStatus.COMPLETED:
        out[request_id] = _settled(own)
    elif own.status != RequestStatus.SETTLING:
        out[request_id] = ReceiptRejected(f"request is {own.status.value}, not settling")
    elif own.delivery is None:
        out[request_id] = AwaitingDelivery("waiting for the buyer's handler to say what it delivered")
    else:
        reqs.append(own)
    # The others go with it even when it is not payable itself (settled by an earlier batch):
    # a settle task stands for every receipt accepted while it was pending (Runtime.enqueue_settle).
    if limit > 1:
        reqs += list(session.exec(
            select(InferenceRequest)
            .where(InferenceRequest.status == RequestStatus.SETTLING, InferenceRequest.id != request_id,
                   col(InferenceRequest.delivery).is_not(None))
            .order_by(col(InferenceRequest.id)).limit(limit - len(reqs))
            .with_for_update(skip_locked=True)
        ).all())
    if not reqs:
        return out
    node_ids = sorted({r.node_id for r in reqs if r.node_id})
    session.exec(select(Node).where(col(Node.id).in_(node_ids)).order_by(col(Node.id)).with_for_update()).all()
    offers = {(o.node_id, o.model): o for o in session.exec(
        select(NodeOffer).where(col(NodeOffer.node_id).in_(node_ids)).order_by(col(NodeOffer.id)).with_for_update())}
    session.exec(select(ReceiptRecord).where(col(ReceiptRecord.request_id).in_([r.id for r in reqs]))).all()
    with session.no_autoflush:  # all rows are in the session now: no query per request
        charges = {r.id: _charge(session, r, settings.platform_fee_bps) for r in reqs}
    paying = [r for r in reqs if r.hold_id is not None]
    results = settle_many(session, [
        Settlement(r.hold_id, [p for p in charges[r.id].parts if p[1] > 0], f"settle:{r.id}",
                   tuple(charges[r.id].subsidy)) for r in paying
    ], fee_bps=settings.platform_fee_bps)
    failed = {r.id: res for r, res in zip(paying, results) if isinstance(res, Exception)}
    with session.no_autoflush:
        for r in reqs:
            out[r.id] = failed.get(r.id) or _complete(session, r, charges[r.id], offers.get((r.node_id, r.model)))
    return out


def settle(session: Session, receipt: Receipt, node_id: str, relayed: Relayed,
           settings: CoordinatorSettings) -> Settled:
    """Both phases in one transaction, the buyer having received every relayed token
    (tests and tools)."""
    accepted = accept_receipt(session, receipt, node_id, relayed, settings)
    if accepted.quote is not None:
        acknowledge(session, receipt.request_id, accepted.quote.relayed, Delivery.COMPLETE)
    return settle_accepted(session, receipt.request_id, settings)


def _learn_speed(session: Session, req: InferenceRequest, relayed: Relayed, rtt_ms: float,
                 offer: NodeOffer | None = None) -> None:
    """Feed what the coordinator itself measured into the offer's speed estimate."""
    if offer is None:
        offer = session.exec(select(NodeOffer).where(NodeOffer.node_id == req.node_id,
                                                     NodeOffer.model == req.model)).first()
    if offer is None:
        return
    ttft = None if relayed.ttft_ms is None else max(0.0, relayed.ttft_ms - rtt_ms)
    node = session.get(Node, req.node_id)
    speed.observe(offer, prompt_tokens=req.prompt_tokens or 0, ttft_ms=ttft, output_tokens=relayed.token_count,
                  decode_ms=relayed.seconds * 1000, concurrent_streams=relayed.concurrent_streams,
                  slowdown_per_stream=speed.curve_of(node, offer).slowdown_per_stream)
    session.add(offer)


def fail_request(session: Session, request_id: str, reason: str, *,
                 status: RequestStatus = RequestStatus.FAILED, only_node: str | None = None) -> bool:
    """End an unfinished request unpaid: the hold goes back to the buyer in full.
    With `only_node`, only if the request is still that node's (not failed over)."""
    req = session.get(InferenceRequest, request_id, with_for_update=True)
    if req is None or req.status.finished or (only_node is not None and req.node_id != only_node):
        return False
    if req.hold_id is not None:
        Ledger(session).void_hold(req.hold_id, idempotency_key=f"void:{req.id}")
    req.status, req.error, req.finished_at = status, reason, utcnow()
    session.add(req)
    return True
