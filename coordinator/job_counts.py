"""Each node's job counters (`Node.jobs`, `Node.session_jobs`: what its audit rate is
computed from), written in batches instead of in every receipt's transaction.

Counting a job in the receipt's own transaction updated the node's row, which every
settlement of that node locks for its whole transaction: on PostgreSQL at 32 streams to one
node the receipt's commit waited 317 ms (p50) for it, and every stream's end with it
(`bench/OVERHEAD.md`). Here a committed receipt adds one to an in-memory count; a worker
thread writes the counts of all nodes that finished jobs meanwhile, one UPDATE per node
(`jobs + n`), and takes whatever arrived during its write next.

The counts lag by what is not written yet, and a process that dies loses those: both only
ever undercount, which keeps a node on its higher new-node and new-session audit rates a
little longer (`scheduler/audit.py`), never shorter. A job counts toward `session_jobs` only
in the channel session it was done in: a count written after the node reconnected (which
resets `session_jobs`) adds to `jobs` alone.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter

from sqlalchemy import case, update

from coordinator.models import Node

log = logging.getLogger(__name__)


class JobCounts:
    def __init__(self, rt) -> None:
        self.rt = rt
        self._lock = threading.Lock()
        self._pending: Counter[tuple[str, str | None]] = Counter()
        self._running = False
        self._idle = threading.Event()
        self._idle.set()

    def add(self, node_id: str, channel_id: str | None) -> None:
        """One more finished job of `node_id`, done on its channel `channel_id`."""
        with self._lock:
            self._pending[(node_id, channel_id)] += 1
            if self._running:
                return
            self._running = True
            self._idle.clear()
        threading.Thread(target=self._drain, name="job-counts", daemon=True).start()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every count added so far is written (tests, shutdown)."""
        return self._idle.wait(timeout)

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch, self._pending = self._pending, Counter()
                if not batch:
                    self._running = False
                    self._idle.set()
                    return
            try:
                self._write(batch)
            except Exception:  # noqa: BLE001 - lost counts only keep the node's audit rate higher
                log.warning("could not write %d node job count(s); they are dropped", sum(batch.values()),
                            exc_info=True)

    def _write(self, batch: Counter) -> None:
        nodes = Node.__table__
        with self.rt.session() as s:
            for (node_id, channel_id), n in sorted(batch.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
                same_session = nodes.c.channel_id.is_(None) if channel_id is None else nodes.c.channel_id == channel_id
                s.execute(update(nodes).where(nodes.c.id == node_id).values(
                    jobs=nodes.c.jobs + n,
                    session_jobs=case((same_session, nodes.c.session_jobs + n), else_=nodes.c.session_jobs)))
