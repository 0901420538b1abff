"""Who may be sold work right now, and why not: one rule for admission, dispatch,
`/v1/models`, `/v1/nodes` and `/metrics`.

A node's offer is routable when the node is live (online, its work channel open, heard
from recently, not banned, not backing off), sells (not an operator-run verifier), has not
been taken out for failing jobs, holds the market's minimum bonded stake, and the offer's
prices are within the operator's ceiling. An offer whose engine gives no token ids or
log-probs cannot be audited: it is routable only where the operator allows unverified
nodes and the buyer asked for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlmodel import Session, col, select

from coordinator.models import Node, NodeOffer
from coordinator.models.account import utcnow
from coordinator.node_registry import is_live
from coordinator.settings import CoordinatorSettings
from pricing.stake import bonded_by_ref


@dataclass(frozen=True)
class Candidate:
    offer: NodeOffer
    node: Node
    # what routing derives from this pair and may keep while the pair is held in memory
    # (`market_view.py`): e.g. its speed fields and its state when idle (`dispatch_store.node_states`)
    memo: dict = field(default_factory=dict, compare=False, repr=False)


def precision(offer: NodeOffer) -> str:
    """An offer's declared weight precision as buyers filter on it (`routing.quantization`):
    "none" for full-precision weights, else the declared name (int8, int4, fp8, ...)."""
    return (offer.quantization or "none").strip().lower() or "none"


def why_not_routable(node: Node, offer: NodeOffer | None, settings: CoordinatorSettings, bonded: int | None,
                     now: datetime | None = None) -> str | None:
    """None if routable (for buyers who accept unverified nodes), else the reason."""
    if node.banned:
        return "banned"
    if node.verify_only:
        return "an operator-run verifier: sells nothing"
    if node.excluded_reason:
        return node.excluded_reason
    if not is_live(node, settings, now):
        if node.backoff_until is not None and (now or utcnow()) < node.backoff_until and node.online:
            return f"backing off after {node.failures} failed job(s) until {node.backoff_until.isoformat()}"
        return "offline (no heartbeat or no open work channel)"
    if settings.min_stake and (bonded or 0) < settings.min_stake:
        return f"bonded stake {bonded or 0} nano-USD is below the market's minimum {settings.min_stake}"
    if offer is not None and (offer.price_in > settings.max_price_in or offer.price_out > settings.max_price_out):
        return "prices above the operator's ceiling"
    return None


def candidates(session: Session, settings: CoordinatorSettings, model: str | None = None, *,
               allow_unverified: bool = False, node_ids: list[str] | None = None) -> list[Candidate]:
    """Routable offers (of `model`, or all; of `node_ids` only, if given), with their nodes;
    unverifiable offers only with `allow_unverified` (the buyer's wish) where the operator
    allows them."""
    q = select(NodeOffer, Node).join(Node, Node.id == NodeOffer.node_id)
    if model is not None:
        q = q.where(NodeOffer.model == model)
    if node_ids is not None:
        q = q.where(col(Node.id).in_(node_ids))
    return routable_of(session, settings, session.exec(q).all(), allow_unverified=allow_unverified)


def routable_of(session: Session, settings: CoordinatorSettings, rows, *,
                allow_unverified: bool = False) -> list[Candidate]:
    """`candidates` among (offer, node) `rows` the caller has loaded already."""
    stakes = bonded_by_ref(session, sorted({f"node:{n.id}" for _, n in rows})) if settings.min_stake else {}
    now = utcnow()
    unverified_ok = allow_unverified and settings.allow_unverified_nodes
    return [Candidate(o, n) for o, n in rows
            if why_not_routable(n, o, settings, stakes.get(f"node:{n.id}"), now) is None
            and (o.verifiable or unverified_ok)]


def routable_node_ids(session: Session, settings: CoordinatorSettings) -> set[str]:
    """Nodes with at least one offer some buyer can be routed to (what `/metrics` counts)."""
    return {c.node.id for c in candidates(session, settings, allow_unverified=True)}


def reasons(session: Session, settings: CoordinatorSettings, nodes: list[Node]) -> dict[str, str | None]:
    """Per node: why it is not routable now (None: it is), for the operator's views."""
    stakes = bonded_by_ref(session, [f"node:{n.id}" for n in nodes]) if settings.min_stake else {}
    now = utcnow()
    return {n.id: why_not_routable(n, None, settings, stakes.get(f"node:{n.id}"), now) for n in nodes}
