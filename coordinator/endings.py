"""Where a buyer's side of a request ends, recorded in batches.

Every request ends with one record of what its buyer was written (`delivery.acknowledge`),
or, when nothing was assigned yet, its cancellation. One transaction per request made this
the busiest writer of a loaded coordinator; here the endings of all requests that finish
while a write is running are written together, in the next one, each in its own savepoint
(one bad request does not hold back the others). After the commit: one settle task for
those whose receipt is in (`Runtime.enqueue_settle`), and a cancel to the node of each
request its buyer left.

A process that dies with endings not yet written loses nothing: their receipts are settled
as unacknowledged by the sweep (`delivery_ack_timeout_s`, or at once for a dead replica).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Executor
from dataclasses import dataclass

from coordinator.bus import BusUnavailable
from coordinator.delivery import Delivery, acknowledge
from coordinator.models import InferenceRequest, RequestStatus
from coordinator.settlement import fail_request

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ending:
    request_id: str
    written: int
    delivery: Delivery | None  # None: the buyer left


class Endings:
    def __init__(self, rt) -> None:
        self.rt = rt
        self._lock = threading.Lock()
        self._queue: list[Ending] = []
        self._running = False

    def add(self, ending: Ending, executor: Executor | None = None, loop=None) -> None:
        """Queue `ending`; a write starts in a worker thread unless one is running (it takes
        this one next)."""
        with self._lock:
            self._queue.append(ending)
            if self._running:
                return
            self._running = True
        if loop is not None:
            loop.run_in_executor(executor, self._drain)
        else:
            threading.Thread(target=self._drain, name="endings", daemon=True).start()

    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._running = False
                    return
            try:
                self._write(batch)
            except Exception:  # noqa: BLE001 - the sweep settles unacknowledged receipts later
                log.exception("recording how %d request(s) ended failed", len(batch))

    def _write(self, batch: list[Ending]) -> None:
        ready: list[str] = []
        cancels: list[tuple[str, str]] = []
        with self.rt.session() as s:
            for e in batch:
                try:
                    with s.begin_nested():
                        outcome = _record(s, e)
                except Exception:  # noqa: BLE001
                    log.exception("request %s: recording its delivery failed", e.request_id)
                    continue
                if outcome is None:
                    continue
                is_ready, node_id = outcome
                if is_ready:
                    ready.append(e.request_id)
                if e.delivery != Delivery.COMPLETE and node_id is not None:
                    cancels.append((node_id, e.request_id))
        if ready:
            self.rt.enqueue_settle(ready[0])  # one task settles them all (see Runtime.enqueue_settle)
        for node_id, rid in cancels:
            try:
                self.rt.bus.publish_sync(f"node:{node_id}", {"type": "cancel", "request_id": rid})
            except BusUnavailable as exc:  # the cancel is lost: the node finishes, unpaid beyond the rule
                log.warning("request %s: could not cancel it at its node: %s", rid, exc)


def _record(s, e: Ending) -> tuple[bool, str | None] | None:
    """(receipt in: settle now, node to cancel at), or None if there is nothing to do."""
    req = s.get(InferenceRequest, e.request_id, with_for_update=True)
    if req is None or req.status.finished:
        return None
    if req.status == RequestStatus.QUEUED:
        fail_request(s, e.request_id, "the buyer's connection ended before a node took the request",
                     status=RequestStatus.CANCELLED)
        return None
    return acknowledge(s, e.request_id, e.written, e.delivery or Delivery.BUYER_GONE), req.node_id
