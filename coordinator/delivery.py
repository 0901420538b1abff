"""What reached the buyer, and who pays for what did not.

The node is paid for the tokens the coordinator relayed from it (its receipt must match
them); the buyer is charged only for the tokens its handler actually wrote to it. The two
differ when something between them broke. The buyer's handler acknowledges what it wrote
with one of these outcomes, and settlement waits for that acknowledgement:

- `complete`: the buyer got the whole answer. Buyer and node: every relayed token.
- `buyer_gone`: the buyer closed the stream. Buyer: what it was written; the node is paid
  the same (the tokens it made before the cancel reached it were sold to nobody, a few at
  most; paying them would let a seller and a buyer in collusion bill the platform).
- `relay_broken`: the market lost tokens on the way (the relay bus dropped, a sequence gap,
  a continuation the buyer would have seen with a hole). Buyer: what it was written. Node:
  every relayed token; the platform pays the difference (`relay_loss` transfers, from its
  fees, then from the operator's own money).
- `unacked`: no acknowledgement came within `delivery_ack_timeout_s` (the API process that
  served the buyer died). Buyer: nothing. Node: every relayed token; the platform pays.

The buyer never pays for a token it did not get; no outcome charges the prompt when no
token was delivered, unless the answer was complete.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from datetime import datetime

from sqlmodel import Session, col, select

from coordinator.models import InferenceRequest, ReceiptRecord, RequestStatus
from pricing.money import allocate_in_order, fee_of, segment_charges


class Delivery(str, enum.Enum):
    COMPLETE = "complete"
    BUYER_GONE = "buyer_gone"
    RELAY_BROKEN = "relay_broken"
    UNACKED = "unacked"

    @property
    def market_fault(self) -> bool:
        return self in (Delivery.RELAY_BROKEN, Delivery.UNACKED)


@dataclass(frozen=True)
class Quote:
    """What the charge of a finished request depends on, besides what was delivered:
    the prompt count, each segment's locked prices and relayed tokens (stream order; more
    than one after a failover), and the hold that caps it all."""

    prompt_tokens: int
    segments: tuple[tuple[int, int, int], ...]  # (price_in, price_out, relayed tokens)
    hold: int

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "segments": [list(s) for s in self.segments],
                "hold": self.hold}

    @classmethod
    def from_dict(cls, d: dict) -> "Quote":
        return cls(int(d["prompt_tokens"]), tuple(tuple(int(x) for x in s) for s in d["segments"]),
                   int(d["hold"]))

    @property
    def relayed(self) -> int:
        return sum(s[2] for s in self.segments)

    def seller_gross(self) -> list[int]:
        """Per segment: what its node earns for the tokens it delivered to the coordinator."""
        return segment_charges(self.prompt_tokens, list(self.segments), self.hold)

    def buyer_gross(self, delivered: int, delivery: Delivery) -> list[int]:
        """Per segment: what the buyer pays, for the first `delivered` tokens of the stream."""
        delivered = min(delivered, self.relayed)
        prompt = self.prompt_tokens if delivered > 0 or delivery == Delivery.COMPLETE else 0
        tokens = allocate_in_order([s[2] for s in self.segments], delivered)
        return segment_charges(prompt, [(s[0], s[1], t) for s, t in zip(self.segments, tokens)], self.hold)

    def buyer_cost(self, delivered: int, delivery: Delivery) -> int:
        return sum(self.buyer_gross(delivered, delivery))

    def subsidies(self, delivered: int, delivery: Delivery, fee_bps: int) -> list[int]:
        """Per segment: the net the platform adds so the node gets what it relayed (only
        where the market lost the tokens; see the module docstring)."""
        if not delivery.market_fault:
            return [0] * len(self.segments)
        net = [g - fee_of(g, fee_bps) for g in self.seller_gross()]
        paid = [g - fee_of(g, fee_bps) for g in self.buyer_gross(delivered, delivery)]
        return [max(0, n - p) for n, p in zip(net, paid)]

    def seller_tokens(self, delivered: int, delivery: Delivery) -> list[int]:
        """Per segment: tokens the node is paid for (by buyer or platform)."""
        if delivery.market_fault:
            return [s[2] for s in self.segments]
        return allocate_in_order([s[2] for s in self.segments], min(delivered, self.relayed))


def quote_of(req: InferenceRequest, prompt_tokens: int, last_relayed: int) -> Quote:
    """A segment whose audit failed before the request was paid (`voided`; the last node's:
    `final_voided`) is priced at zero: neither the buyer nor its node pays or earns for it."""
    segs = [(0, 0, int(s["tokens"])) if s.get("voided") else (int(s["price_in"]), int(s["price_out"]), int(s["tokens"]))
            for s in req.payload.get("segments", [])]
    segs.append((0, 0, last_relayed) if req.payload.get("final_voided") else
                (req.price_in or 0, req.price_out or 0, last_relayed))
    return Quote(prompt_tokens, tuple(segs), req.hold_amount)


def void_segment(req: InferenceRequest, index: int) -> None:
    """Price segment `index` of a request not yet paid at zero (its audit failed)."""
    payload = dict(req.payload)
    segments = [dict(s) for s in payload.get("segments", [])]
    if index < len(segments):
        segments[index]["voided"] = True
        payload["segments"] = segments
    else:
        payload["final_voided"] = True
    req.payload = payload


def acknowledge(session: Session, request_id: str, delivered: int, delivery: Delivery) -> bool:
    """Record what the buyer's handler wrote (first acknowledgement wins). True if the
    request's receipt is in, so it can be settled now."""
    req = session.get(InferenceRequest, request_id, with_for_update=True)
    if req is None or req.delivery is not None:
        return False
    req.delivered_tokens, req.delivery = max(0, int(delivered)), delivery.value
    session.add(req)
    return req.status == RequestStatus.SETTLING


def unacknowledged(session: Session, receipt_before: datetime) -> list[str]:
    """Requests whose receipt came in before `receipt_before` and whose buyer's handler
    has still not acknowledged its delivery."""
    return list(session.exec(
        select(InferenceRequest.id).join(ReceiptRecord, ReceiptRecord.request_id == InferenceRequest.id)
        .where(InferenceRequest.status == RequestStatus.SETTLING, col(InferenceRequest.delivery).is_(None),
               ReceiptRecord.created_at < receipt_before)).all())
