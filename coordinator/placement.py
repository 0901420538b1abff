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

from sqlmodel import Session, select

from coordinator.dispatch_store import free_slots, node_states, pending_of
from coordinator.models import InferenceRequest, NodeOffer, RequestStatus
from coordinator.models.account import utcnow
from coordinator.settings import CoordinatorSettings
from scheduler.dispatch import route_in_groups
from scheduler.routing import get_policy


def place_now(session: Session, req: InferenceRequest, settings: CoordinatorSettings) -> str | None:
    """Assign the just-admitted `req` (flushed, in this session) if it can go at once; the
    node's id, or None (it stays queued). The caller publishes the assignment after commit."""
    older = session.exec(select(InferenceRequest.id).where(
        InferenceRequest.status == RequestStatus.QUEUED, InferenceRequest.model == req.model,
        InferenceRequest.id != req.id).limit(1)).first()
    if older is not None:  # the queue goes first, in its order
        return None
    decision = route_in_groups(get_policy(settings.routing_policy), [pending_of(req, utcnow())],
                               node_states(session, settings, {req.model}))
    node_id = decision.assignments.get(req.id)
    if node_id is None or free_slots(session, {node_id}).get(node_id, 0) <= 0:
        return None
    offer = session.exec(select(NodeOffer).where(NodeOffer.node_id == node_id, NodeOffer.model == req.model)).first()
    if offer is None:
        return None
    req.status, req.node_id, req.assigned_at = RequestStatus.ASSIGNED, node_id, utcnow()
    req.price_in, req.price_out = offer.price_in, offer.price_out
    session.add(req)
    return node_id
