"""Mid-stream failover: when a node stops streaming (connection lost, or no token within
the timeout), the rest of the request goes back to the queue and continues on another
node from prompt + the tokens already delivered, so the buyer sees one stream.

The failed node's share is recorded as a segment (its locked price and the number of
tokens the coordinator relayed from it) and is paid at settlement; the node's failure is
recorded (`node_registry.record_failure`: backoff, error rate, reputation, exclusion after
repeated failures). An error the node reports is handled the same way as a stall.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session

from coordinator.audits import maybe_select
from coordinator.models import InferenceRequest, Node, RequestStatus
from coordinator.node_registry import record_failure
from coordinator.settings import CoordinatorSettings
from coordinator.settlement import fail_request

ACTIVE = (RequestStatus.ASSIGNED, RequestStatus.RUNNING)


MAX_FAILOVERS = 3  # a request that has failed over this often fails (unpaid) on the next failure


@dataclass
class FailedOver:
    moved: bool  # back in the queue, to continue on another node
    excluded: str | None = None  # the failed node was taken out of routing (tell it why)
    failed: bool = False  # not moved: the request was ended here, unpaid (tell the buyer)
    audit_id: int | None = None  # the failed node's segment was kept for an audit: dispatch it

    def __bool__(self) -> bool:
        return self.moved


def fail_over(session: Session, request_id: str, node_id: str, delivered_ids: list[int] | None, *,
              count: int | None = None, text: str = "", reason: str | None = None,
              settings: CoordinatorSettings | None = None, logprobs: list[int] | None = None) -> FailedOver:
    """Requeue `request_id` after `node_id` failed having delivered `count` tokens
    (default `len(delivered_ids)`): their ids (None when its engine could not name them),
    their log-probs (None when unknown) and their text. The next node continues after them:
    from the ids when every segment so far had ids (exact), else from the text. The
    segment is paid, so it is a job like any other: audited at the node's rate
    (`audits.maybe_select`) — cheating on part of a stream, then stalling, is no way out.

    False (and nothing changed) if the request is no longer that node's to fail: it has
    finished, or another handler already failed it over.
    """
    req = session.get(InferenceRequest, request_id, with_for_update=True)
    if req is None or req.node_id != node_id or req.status not in ACTIVE:
        return FailedOver(False)
    node = session.get(Node, node_id, with_for_update=True)
    excluded = record_failure(node, reason=reason, settings=settings) if node is not None else None
    if node is not None:
        session.add(node)
    payload = dict(req.payload)
    segments = list(payload.get("segments", []))
    if req.delivery is not None or payload.get("failovers", 0) >= MAX_FAILOVERS:
        why = "after the buyer's stream had ended" if req.delivery is not None else \
            f"and the request had already failed over {MAX_FAILOVERS} times"
        fail_request(session, request_id, f"node {node_id[:12]} failed {why}")
        return FailedOver(False, excluded, failed=True)
    payload["failovers"] = payload.get("failovers", 0) + 1
    n = len(delivered_ids or []) if count is None else count
    audit = None
    if n and node is not None:
        ids = list(delivered_ids or [])[:n] if delivered_ids is not None and len(delivered_ids) >= n else []
        lps = list(logprobs or [])[:n] if logprobs is not None and len(logprobs) >= n else []
        audit = maybe_select(session, req, node, ids, lps, None, settings or CoordinatorSettings())
    if n:  # a node that delivered nothing is owed nothing: no segment
        segments.append({"node_id": node_id, "price_in": req.price_in or 0, "price_out": req.price_out or 0,
                         "tokens": n, "prompt_charged": not segments})
    payload["segments"] = segments
    exact = payload.get("prefix_exact", True) and delivered_ids is not None and len(delivered_ids) == n
    payload["prefix_exact"] = exact
    payload["prefix_token_ids"] = list(payload.get("prefix_token_ids", [])) + list(delivered_ids or []) if exact else []
    payload["prefix_text"] = payload.get("prefix_text", "") + text
    req.payload = payload
    req.status, req.node_id, req.price_in, req.price_out = RequestStatus.QUEUED, None, None, None
    session.add(req)
    return FailedOver(True, excluded, audit_id=audit.id if audit else None)
