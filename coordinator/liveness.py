"""What this process's work channels hear that needs no transaction of its own — node
liveness and streams that started — written to the database in batches.

A connected node proves it is alive with a `beat` frame on its work channel (already
authenticated by the signed hello): no signature check, no nonce row and no database write
per beat. The coordinator answers `beat_ack` at once (the node's own health check) and
notes the node here; its pongs (the round trip the coordinator measures itself) too.
`flush` writes everything heard since the last flush in a few statements, every `FLUSH_S`
(`app.py`), so the cost grows with the number of nodes per second, not per message, and
10,000 connected nodes cost one process a small share of a core. A node without a channel
still uses the signed HTTP heartbeat (`POST /v1/nodes/heartbeat`).

A stream's first token moves its request from ASSIGNED to RUNNING (the sweep requeues
requests assigned long ago that never started); that mark is batched the same way instead
of costing every request a write transaction on its first token.
"""

from __future__ import annotations

import threading

from datetime import datetime

from sqlalchemy import bindparam, case, func, literal, text, update
from sqlmodel import Session, col

from coordinator.models import InferenceRequest, Node, RequestStatus
from coordinator.models.account import utcnow

FLUSH_S = 1.0
CHUNK = 500  # node ids per UPDATE
RTT_WEIGHT = 0.2  # the stored round trip is an exponentially weighted average


class Liveness:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._rtt: dict[str, float] = {}
        self._started: dict[str, datetime] = {}

    def started(self, request_id: str) -> None:
        """The stream of `request_id` relayed its first token now."""
        with self._lock:
            self._started.setdefault(request_id, utcnow())

    def heard(self, node_id: str, rtt_ms: float | None = None) -> None:
        with self._lock:
            self._seen.add(node_id)
            if rtt_ms is not None:
                self._rtt[node_id] = rtt_ms

    def pending(self) -> int:
        with self._lock:
            return len(self._seen) + len(self._started)

    def flush(self, session: Session) -> int:
        """Write what was heard since the last flush; returns how many nodes. On a database
        error what was taken is put back, to be written by the next flush."""
        with self._lock:
            seen, rtt, started = self._seen, self._rtt, self._started
            self._seen, self._rtt, self._started = set(), {}, {}
        try:
            now, ids = utcnow(), sorted(seen)
            for i in range(0, len(ids), CHUNK):
                session.exec(update(Node).where(col(Node.id).in_(ids[i:i + CHUNK]), col(Node.banned).is_(False))
                             .values(last_heartbeat_at=now, online=True))
            if rtt:
                session.connection().execute(text(
                    "UPDATE nodes SET rtt_ms = CASE WHEN rtt_ms > 0 THEN :keep * rtt_ms + :w * :r ELSE :r END "
                    "WHERE id = :id"), [{"id": k, "r": v, "w": RTT_WEIGHT, "keep": 1 - RTT_WEIGHT}
                                        for k, v in sorted(rtt.items())])
            if started:
                t = InferenceRequest.__table__
                session.connection().execute(
                    # the first token's time is kept even when the request ended before this
                    # flush (short answers do, well within a second): TTFT history depends on it
                    update(t).where(t.c.id == bindparam("b_id"))
                    .values(status=case((t.c.status == RequestStatus.ASSIGNED, literal(RequestStatus.RUNNING, t.c.status.type)),
                                        else_=t.c.status),
                            first_token_at=func.coalesce(t.c.first_token_at, bindparam("b_at"))),
                    [{"b_id": k, "b_at": v} for k, v in sorted(started.items())])
            session.flush()
        except Exception:
            with self._lock:
                self._seen |= seen
                self._rtt = {**rtt, **self._rtt}
                self._started = {**started, **self._started}
            raise
        return len(ids)
