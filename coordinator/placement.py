"""Placing a request in the transaction that admits it: the quiet market's fast path.

When nothing else of the model waits in the queue, the request is routed right away by the
same policy a dispatch round uses (`scheduler.dispatch.route_in_groups` over the same node
snapshot, `dispatch_store.node_states`) and written as ASSIGNED together with its hold —
one transaction, no second session, no broker round trip before the first token. The node's
free slots are re-counted under the per-node lock (`dispatch_store.free_slots`), like every
round. Anything else — older requests queued, no node free, a policy that would reject or
defer — is left QUEUED for the Celery micro-batch round (`Runtime.trigger_dispatch`), which keeps order and
publishes rejections.
"""

from __future__ import annotations

from collections.abc import Collection

from sqlmodel import Session, col, select

from coordinator.affinity import PrefixMap
from coordinator.dispatch_store import active_on, lock_slots, node_states, pending_of
from coordinator.market_view import MarketView
from coordinator.models import InferenceRequest, Node, NodeOffer, RequestStatus
from coordinator.models.account import utcnow
from coordinator.routability import why_not_routable
from coordinator.settings import CoordinatorSettings
from pricing.stake import bonded_by_ref
from scheduler.dispatch import route_in_groups
from scheduler.routing import get_policy
from scheduler.shortlist import shortlist


def place_now(session: Session, req: InferenceRequest, settings: CoordinatorSettings,
              view: MarketView | None = None, affinity: PrefixMap | None = None) -> str | None:
    """Assign the just-admitted `req` (flushed, in this session) if it can go at once; the
    node's id, or None (it stays queued). The caller publishes the assignment after commit."""
    node_id = choose(session, req, settings, view, affinity)
    return node_id if node_id is not None and claim(session, req, node_id, settings) else None


def choose(session: Session, req: InferenceRequest, settings: CoordinatorSettings,
           view: MarketView | None = None, affinity: PrefixMap | None = None,
           siblings: Collection[str] = ()) -> str | None:
    """The node the policy would give `req` now, or None (older requests of its model wait,
    or none fits). Takes no lock. Among `view`'s offers (in memory, maybe a second old)
    when given; `claim` then checks the node's own row. With `affinity` (the process's
    prefix map), nodes that recently served a prefix of its prompt score their saved prefill.
    `siblings`: the other choices admitted with it (n > 1), which do not queue ahead of it."""
    older = session.exec(select(InferenceRequest.id).where(
        InferenceRequest.status == RequestStatus.QUEUED, InferenceRequest.model == req.model,
        col(InferenceRequest.id).not_in([req.id, *siblings])).limit(1)).first()
    if older is not None:  # the queue goes first, in its order
        return None
    pending = pending_of(req, utcnow(), affinity)
    decision = route_in_groups(get_policy(settings.routing_policy), [pending],
                               shortlist(node_states(session, settings, {req.model}, view), pending))
    return decision.assignments.get(req.id)


def claim(session: Session, req: InferenceRequest, node_id: str, settings: CoordinatorSettings) -> bool:
    """Assign `req` to `node_id` if the node still has a free slot (counted under its lock,
    held to the end of the transaction: call this last) and is still routable at a price
    the request's hold covers. The node and its offer as they are now (the policy may have
    seen an older copy) come in one read, its active requests in a second."""
    if session.get_bind().dialect.name == "postgresql":
        lock_slots(session, [node_id])
    row = session.exec(select(Node, NodeOffer).join(NodeOffer, col(NodeOffer.node_id) == Node.id)
                       .where(Node.id == node_id, NodeOffer.model == req.model)
                       .execution_options(populate_existing=True)).first()
    if row is None:
        return False
    node, offer = row
    if node.max_concurrency - active_on(session, node_id) <= 0 or not _still_routable(session, req, node, offer, settings):
        return False
    req.status, req.node_id, req.assigned_at = RequestStatus.ASSIGNED, node_id, utcnow()
    req.price_in, req.price_out = offer.price_in, offer.price_out
    session.add(req)
    return True


def _still_routable(session: Session, req: InferenceRequest, node: Node, offer: NodeOffer,
                    settings: CoordinatorSettings) -> bool:
    """Routable, and its offer within the prices the request's hold covers."""
    bonded = bonded_by_ref(session, [f"node:{node.id}"]).get(f"node:{node.id}") if settings.min_stake else None
    if why_not_routable(node, offer, settings, bonded) is not None:
        return False
    if not offer.verifiable and not (settings.allow_unverified_nodes and req.routing.get("allow_unverified")):
        return False
    return offer.price_out <= req.routing.get("max_price", offer.price_out) and \
        offer.price_in <= req.routing.get("max_price_in", offer.price_in)
