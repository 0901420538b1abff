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
from collections import Counter

from sqlalchemy import case, update

from coordinator.models import Node
from coordinator.write_behind import WriteBehind

log = logging.getLogger(__name__)


class JobCounts(WriteBehind):
    name = "job-counts"

    def __init__(self, rt) -> None:
        self.rt = rt
        super().__init__()

    def _empty(self) -> Counter:
        return Counter()

    def add(self, node_id: str, channel_id: str | None) -> None:
        """One more finished job of `node_id`, done on its channel `channel_id`."""
        self._submit(lambda counts: counts.update([(node_id, channel_id)]))

    def _write_batch(self, batch: Counter) -> None:
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
