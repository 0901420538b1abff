"""The scheduler's view of the database: the `DispatchStore` the Celery tasks run on.

Assignment is idempotent: a request is assigned only while it is still `queued` (a
conditional UPDATE), so a redelivered or concurrent dispatch round never assigns twice.
Notifications (to the node's work channel and the buyer's handler) go out after commit.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import ContextManager, Protocol

from sqlalchemy import func, text, update
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, col, select

from coordinator import history, speed, web_auth
from coordinator.affinity import PrefixMap, prefix_chain
from coordinator.audits import due_for_dispatch, expire_stale
from coordinator.bus import Bus
from coordinator.canary import send_canaries
from coordinator.frames import assignment_frame
from coordinator.settings import CoordinatorSettings
from coordinator.delivery import Delivery, acknowledge, unacknowledged
from coordinator.models import InferenceRequest, Node, NodeOffer, RequestStatus
from coordinator.models.account import utcnow
from coordinator.node_registry import is_live, mark_silent_offline, prune_nonces
from coordinator.replicas import dead_replicas, end_orphans
from coordinator.market_view import MarketView
from coordinator.metrics import observe_queue_wait
from coordinator.routability import Candidate, candidates, precision
from coordinator.settlement import SETTLE_BATCH, AwaitingDelivery, Settled, fail_request, settle_accepted_batch
from pricing.ledger import Ledger, expire_holds, prune_idempotency
from pricing.stake import withdraw_matured
from scheduler.dispatch import AppliedDecision
from scheduler.errors import TransientStoreError
from scheduler.routing import Decision, NodeState, PendingRequest


log = logging.getLogger(__name__)
ACTIVE = (RequestStatus.ASSIGNED, RequestStatus.RUNNING)
ABANDON_GRACE_S = 15.0  # past the buyer handler's own assignment timeout: its hold is released


class _Runtime(Protocol):
    """What the store needs of the process's runtime (coordinator.runtime.Runtime)."""

    settings: CoordinatorSettings
    bus: Bus

    def session(self) -> ContextManager[Session]: ...
    def trigger_dispatch(self) -> None: ...
    def kick_dispatch(self) -> None: ...
    def clear_dispatch_flag(self) -> None: ...
    def enqueue_settle(self, request_id: str) -> None: ...
    def dispatch_audit(self, audit_id: int) -> bool: ...


def pending_of(r: InferenceRequest, now, affinity: PrefixMap | None = None) -> PendingRequest:
    """A queued request as the routing policy sees it (with the nodes that recently served
    a prefix of its prompt, when `affinity` is given: cache-aware routing)."""
    cached = affinity.lookup(prefix_chain(r.model, r.payload)) if affinity is not None and len(affinity) else ()
    return PendingRequest(
        id=r.id, model=r.model, prompt_tokens=r.prompt_tokens_est, max_tokens=r.max_tokens,
        region=r.routing.get("region"), sort=r.routing.get("sort"),
        max_price=r.routing.get("max_price"), max_ttft_ms=r.routing.get("max_ttft_ms"),
        min_tokens_per_s=r.routing.get("min_tokens_per_s"),
        max_price_in=r.routing.get("max_price_in"),
        allow_unverified=bool(r.routing.get("allow_unverified")),
        quantization=tuple(r.routing["quantization"]) if r.routing.get("quantization") else None,
        waited_ms=max(0.0, (now - r.created_at).total_seconds() * 1000),
        cached_tokens=cached,
    )


def node_states(s: Session, settings: CoordinatorSettings, models: set[str],
                view: MarketView | None = None) -> list[NodeState]:
    """Routable offers for these models with their free slots, as the policy sees them
    (offers from `view`, in memory, when given; else from the database)."""
    rows = [c for m in sorted(models) for c in (
        view.candidates(m, allow_unverified=True) if view is not None else
        candidates(s, settings, m, allow_unverified=True))]
    busy = dict(s.exec(select(InferenceRequest.node_id, func.count())
                       .where(InferenceRequest.status.in_(ACTIVE))  # type: ignore[attr-defined]
                       .group_by(InferenceRequest.node_id)).all()) if rows else {}
    return [_state(c, busy.get(c.node.id, 0)) for c in rows]


def _state(c: Candidate, active: int) -> NodeState:
    """The policy's view of one offer with `active` requests on its node. A candidate held
    in memory (`market_view.py`) keeps its speed fields and its idle state: a fleet of
    thousands of mostly idle nodes costs a lookup per node, not an estimate."""
    if active == 0 and "idle" in c.memo:
        return c.memo["idle"]
    offer, node = c.offer, c.node
    if "fields" not in c.memo:
        c.memo["fields"] = speed.routing_fields(offer)
    fields = dict(c.memo["fields"])
    slots, per_stream = speed.share(node, offer, active, fields)
    fields["tokens_per_s"] = per_stream
    fields.pop("tokens_per_s_by_bucket", None)  # per-bucket figures are single-stream
    state = NodeState(
        id=node.id, model=offer.model, price_in=offer.price_in, price_out=offer.price_out,
        region=node.region, free_slots=slots,
        load=min(1.0, active / max(1, node.max_concurrency)), rtt_ms=node.rtt_ms,
        reputation=node.reputation, verifiable=offer.verifiable, prefill_tokens_per_s=_prefill_rate(node),
        quantization=precision(offer), **fields,
    )
    if active == 0:
        c.memo["idle"] = state
    return state


BYTES_PER_TOKEN = 4.0  # routing counts prompts in UTF-8 bytes (admission); about 4 per token


def _prefill_rate(node: Node) -> float | None:
    """The node's benchmarked single-stream prefill speed, in prompt bytes per second (the
    unit routing counts prompts in), for the saved-prefill estimate of cache affinity."""
    rows = (node.benchmark or {}).get("batches") or []
    rate = next((r.get("prefill_tok_s") for r in rows if r.get("batch") == 1), None)
    return float(rate) * BYTES_PER_TOKEN if rate else None


def free_slots(s: Session, node_ids: set[str]) -> dict[str, int]:
    """Free slots per node (max_concurrency - its active requests), counted under a
    per-node lock, so that rounds running at once (inline in API processes, workers)
    never assign a node more than it can take. SQLite's write lock already serialises
    them; PostgreSQL takes a transaction-scoped advisory lock per node, in id order."""
    ids = sorted(node_ids)
    if not ids:
        return {}
    if s.get_bind().dialect.name == "postgresql":
        lock_slots(s, ids)
    cap = dict(s.exec(select(Node.id, Node.max_concurrency).where(col(Node.id).in_(ids))).all())
    busy = dict(s.exec(select(InferenceRequest.node_id, func.count()).where(
        col(InferenceRequest.node_id).in_(ids), col(InferenceRequest.status).in_(ACTIVE))
        .group_by(InferenceRequest.node_id)).all())
    return {nid: cap.get(nid, 0) - busy.get(nid, 0) for nid in ids}


def lock_slots(s: Session, node_ids: list[str]) -> None:
    """PostgreSQL: the transaction-scoped advisory locks of these nodes' slots, in id order."""
    for nid in sorted(node_ids):
        s.exec(text("SELECT pg_advisory_xact_lock(hashtext(:k))").bindparams(k=f"slots:{nid}"))


def active_on(s: Session, node_id: str) -> int:
    """Requests assigned to or running on `node_id` (count under `lock_slots` on PostgreSQL)."""
    return s.exec(select(func.count()).select_from(InferenceRequest).where(
        InferenceRequest.node_id == node_id, col(InferenceRequest.status).in_(ACTIVE))).one()


class SqlDispatchStore:
    def __init__(self, runtime: _Runtime):
        self.rt = runtime

    def clear_dispatch_flag(self) -> None:
        self.rt.clear_dispatch_flag()

    def pending(self, limit: int) -> list[PendingRequest]:
        try:
            with self.rt.session() as s:
                rows = s.exec(
                    select(InferenceRequest).where(InferenceRequest.status == RequestStatus.QUEUED)
                    .order_by(InferenceRequest.created_at).limit(limit)
                ).all()
        except OperationalError as exc:
            raise TransientStoreError(str(exc)) from exc
        now = utcnow()
        affinity = getattr(self.rt, "affinity", None)
        return [pending_of(r, now, affinity) for r in rows]

    def nodes(self, models: set[str]) -> list[NodeState]:
        """Routable offers for these models (unverifiable ones too, where the operator allows
        them: the dispatch round gives those only to buyers who asked), with free slots."""
        with self.rt.session() as s:
            return node_states(s, self.rt.settings, models)

    def apply(self, decision: Decision) -> AppliedDecision:
        result = AppliedDecision(deferred=len(decision.deferred))
        assigned: list[InferenceRequest] = []
        rejected: list[tuple[str, str]] = []
        now = utcnow()
        try:
            with self.rt.session() as s:
                room = free_slots(s, set(decision.assignments.values()))
                for rid, node_id in decision.assignments.items():
                    req = s.get(InferenceRequest, rid)
                    offer = s.exec(select(NodeOffer).where(
                        NodeOffer.node_id == node_id, NodeOffer.model == (req.model if req else ""))).first()
                    if req is None or offer is None or room.get(node_id, 0) <= 0:
                        result.skipped += 1  # gone, or the node filled up meanwhile: a later round
                        continue
                    n = s.exec(
                        update(InferenceRequest)
                        .where(InferenceRequest.id == rid, InferenceRequest.status == RequestStatus.QUEUED)
                        .values(status=RequestStatus.ASSIGNED, node_id=node_id, price_in=offer.price_in,
                                price_out=offer.price_out, assigned_at=now)
                    ).rowcount
                    if n != 1:
                        result.skipped += 1
                        continue
                    s.refresh(req)
                    assigned.append(req)
                    room[node_id] -= 1
                for rid, reason in decision.rejections.items():
                    if self._finish_unserved(s, rid, RequestStatus.REJECTED, reason):
                        rejected.append((rid, reason))
        except OperationalError as exc:
            raise TransientStoreError(str(exc)) from exc
        for req in assigned:
            observe_queue_wait(req.created_at, req.assigned_at, failover=bool(req.payload.get("segments")))
            self.rt.bus.publish_sync(f"node:{req.node_id}", assignment_frame(req))
            self.rt.bus.publish_sync(f"req:{req.id}", {"type": "assigned", "node_id": req.node_id})
        for rid, reason in rejected:
            # Constraints no live node meets are the buyer's to change (4xx: the client does
            # not retry); no node of the model online at all is temporary (503, retried).
            temporary = reason.startswith("no online node")
            self.rt.bus.publish_sync(f"req:{rid}", {"type": "error", "status": 503 if temporary else 400,
                                                    "code": "no_capacity" if temporary else "no_route",
                                                    "message": reason})
        result.assigned, result.rejected = len(assigned), len(rejected)
        return result

    @staticmethod
    def _finish_unserved(s, rid: str, status: RequestStatus, reason: str) -> bool:
        """Queued -> `status`, voiding the hold; False if the request had moved on."""
        n = s.exec(
            update(InferenceRequest)
            .where(InferenceRequest.id == rid, InferenceRequest.status == RequestStatus.QUEUED)
            .values(status=status, error=reason, finished_at=utcnow())
        ).rowcount
        if n != 1:
            return False
        req = s.get(InferenceRequest, rid)
        if req.hold_id is not None:
            Ledger(s).void_hold(req.hold_id, idempotency_key=f"void:{rid}")
        return True

    def settle(self, request_id: str) -> dict:
        """Pay `request_id`'s accepted receipt, and with it up to SETTLE_BATCH - 1 other
        accepted receipts no other worker holds (one ledger batch); tell each buyer."""
        self.rt.clear_settle_flag()  # before reading the batch: a receipt accepted from now on asks again
        try:
            with self.rt.session() as s:
                results = settle_accepted_batch(s, request_id, self.rt.settings)
        except OperationalError as exc:
            raise TransientStoreError(str(exc)) from exc
        if len(results) >= SETTLE_BATCH:  # more may wait than one batch takes
            with self.rt.read_session() as s:
                more = s.exec(select(InferenceRequest.id).where(
                    InferenceRequest.status == RequestStatus.SETTLING,
                    col(InferenceRequest.delivery).is_not(None)).limit(1)).first()
            if more is not None:
                self.rt.enqueue_settle(more)
        for rid, res in results.items():
            if not isinstance(res, (Settled, AwaitingDelivery)):
                log.warning("settle %s: %s", rid, res)
        own = results[request_id]
        if not isinstance(own, Settled):
            return {"request_id": request_id, "settled": False, "reason": str(own), "batch": len(results)}
        return {"request_id": request_id, "settled": True, "cost": own.cost, "batch": len(results)}

    def _record_history(self) -> int:
        """The dashboards' per-minute rows (each minute written once), old rows and expired
        sign-ins pruned. A failure here is logged and never stops the rest of the sweep."""
        try:
            with self.rt.session() as s:
                written = history.record(s, self.rt.settings)
                history.prune(s, self.rt.settings)
                web_auth.prune(s)
            return written
        except Exception:  # noqa: BLE001 - history is for people; the sweep's money work must go on
            log.exception("recording the per-minute history failed")
            return 0

    def sweep(self) -> dict:
        """Offline detection, orphaned assignments back to the queue, expired holds."""
        settings = self.rt.settings
        requeued: list[str] = []
        with self.rt.session() as s:
            offline = mark_silent_offline(s, settings)
            stale_cutoff = utcnow() - timedelta(seconds=settings.first_token_timeout_s)
            for req in s.exec(select(InferenceRequest).where(
                    InferenceRequest.status == RequestStatus.ASSIGNED)).all():
                node = s.get(Node, req.node_id) if req.node_id else None
                if node is None or not is_live(node, settings) or (req.assigned_at and req.assigned_at < stale_cutoff):
                    req.status, req.node_id, req.price_in, req.price_out = RequestStatus.QUEUED, None, None, None
                    s.add(req)
                    requeued.append(req.id)
            unacked = unacknowledged(s, utcnow() - timedelta(seconds=settings.delivery_ack_timeout_s))
            for rid in unacked:  # the buyer's handler died with its API process: the market's loss
                acknowledge(s, rid, 0, Delivery.UNACKED)
            unsettled = list(s.exec(select(InferenceRequest.id).where(
                InferenceRequest.status == RequestStatus.SETTLING,
                col(InferenceRequest.delivery).is_not(None))).all())
            overdue = [(r.id, r.node_id) for r in s.exec(select(InferenceRequest).where(
                InferenceRequest.status.in_(ACTIVE + (RequestStatus.QUEUED,)),  # type: ignore[attr-defined]
                InferenceRequest.created_at < utcnow() - timedelta(seconds=settings.request_ttl_s))).all()
                if fail_request(s, r.id, f"not finished within {settings.request_ttl_s:.0f}s")]
            # Never placed: its buyer's handler gives up after assign_timeout_s; if that handler
            # died with its API process, nobody would, and the hold would wait for the TTL.
            abandoned_before = utcnow() - timedelta(seconds=settings.assign_timeout_s + ABANDON_GRACE_S)
            overdue += [(r.id, None) for r in s.exec(select(InferenceRequest).where(
                InferenceRequest.status == RequestStatus.QUEUED, InferenceRequest.created_at < abandoned_before,
                col(InferenceRequest.node_id).is_(None)).limit(1000)).all()
                if not r.payload.get("segments")
                and fail_request(s, r.id, f"no node took it within {settings.assign_timeout_s:.0f}s")]
            orphans = end_orphans(s, dead_replicas(s))  # a dead API process took its buyers with it
            overdue += orphans["failed"]
            audits_expired = expire_stale(s, settings)
            audits_due = [a.id for a in due_for_dispatch(s, settings)]
            pruned = prune_nonces(s, settings)
            unbonded = len(withdraw_matured(s, utcnow()))  # stake past its unbonding delay is paid out
            queued = s.exec(select(func.count()).where(InferenceRequest.status == RequestStatus.QUEUED)).one()
        with self.rt.session() as s:  # its own short transaction: it locks holds, then accounts
            expired = len(expire_holds(s, utcnow(), limit=500))
        with self.rt.session() as s:
            keys_pruned = prune_idempotency(s, utcnow() - timedelta(seconds=settings.idempotency_retention_s))
        history_minutes = self._record_history()
        if queued:
            self.rt.kick_dispatch()
        audits_sent = sum(self.rt.dispatch_audit(aid) for aid in audits_due)
        canaries = send_canaries(self.rt)
        for rid in unsettled:  # a settle task lost with a crashed worker: send it again
            self.rt.enqueue_settle(rid)
        for rid, node_id in overdue:
            if node_id:
                self.rt.bus.publish_sync(f"node:{node_id}", {"type": "cancel", "request_id": rid})
            self.rt.bus.publish_sync(f"req:{rid}", {"type": "error", "status": 504, "code": "timeout",
                                                    "message": "the request did not finish in time; nothing was charged"})
        return {"offline": offline, "requeued": requeued, "nonces_pruned": pruned, "holds_expired": expired,
                "idempotency_keys_pruned": keys_pruned, "history_minutes": history_minutes,
                "settle_resent": unsettled, "unacked": unacked + orphans["unacked"],
                "overdue_failed": [rid for rid, _ in overdue],
                "audits_sent": audits_sent, "audits_expired": audits_expired, "canaries": canaries, "unbonded": unbonded}
