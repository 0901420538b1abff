"""Liveness of API replicas, and what happens to the requests of one that died.

Every API process registers itself (`ApiReplica`) and refreshes `last_seen` every
`REPLICA_BEAT_S`; each request records the replica whose handler serves its buyer. When a
replica stops refreshing (kill -9, a lost machine), its buyers' connections are gone with
it: the sweep ends their requests at once instead of waiting for timeouts — unplaced and
running ones unpaid (the hold released), receipts that wait for a delivery acknowledgement
settled as undelivered (the buyer pays nothing, the platform pays the node).
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlmodel import Session, col, select

from coordinator.delivery import Delivery, acknowledge
from coordinator.models import InferenceRequest, RequestStatus
from coordinator.models.account import utcnow
from coordinator.models.replica import ApiReplica
from coordinator.settlement import fail_request

REPLICA_BEAT_S = 3.0
REPLICA_DEAD_S = 12.0  # four missed beats


def new_replica_id() -> str:
    return "api_" + secrets.token_hex(8)


def beat(session: Session, replica_id: str) -> None:
    row = session.get(ApiReplica, replica_id)
    if row is None:
        row = ApiReplica(id=replica_id, host=socket.gethostname()[:200], pid=os.getpid())
    row.last_seen = utcnow()
    session.add(row)


def leave(session: Session, replica_id: str) -> None:
    session.exec(delete(ApiReplica).where(ApiReplica.id == replica_id))  # type: ignore[call-overload]


def dead_replicas(session: Session, now: datetime | None = None) -> list[str]:
    cutoff = (now or utcnow()) - timedelta(seconds=REPLICA_DEAD_S)
    return list(session.exec(select(ApiReplica.id).where(ApiReplica.last_seen < cutoff)).all())


def end_orphans(session: Session, replicas: list[str]) -> dict[str, list]:
    """End the requests whose buyer's handler lived on one of these dead replicas; forget
    the replicas. Returns {"failed": [(request id, node id or None)], "unacked": [request
    id]} (a failed one may still have a node working: the caller cancels it there)."""
    out: dict[str, list] = {"failed": [], "unacked": []}
    if not replicas:
        return out
    rows = session.exec(select(InferenceRequest).where(
        col(InferenceRequest.replica_id).in_(replicas),
        col(InferenceRequest.status).in_((RequestStatus.QUEUED, RequestStatus.ASSIGNED, RequestStatus.RUNNING,
                                          RequestStatus.SETTLING)))).all()
    for r in rows:
        if r.status == RequestStatus.SETTLING:
            if r.delivery is None and acknowledge(session, r.id, 0, Delivery.UNACKED):
                out["unacked"].append(r.id)
        elif fail_request(session, r.id, "the API process serving the buyer stopped; nothing was charged"):
            out["failed"].append((r.id, r.node_id))
    session.exec(delete(ApiReplica).where(col(ApiReplica.id).in_(replicas)))  # type: ignore[call-overload]
    return out
