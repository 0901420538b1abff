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
That charges the buyer nothing, so a handler that is about to tell the buyer what it cost
(the usage chunk of a stream) first waits for its ending to be written: `add` returns a
future that resolves once it is (True), or once writing it failed (False).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor, Future, InvalidStateError
from dataclasses import dataclass

from sqlalchemy import bindparam, select, update

from coordinator.bus import BusUnavailable
from coordinator.db import writes_first
from coordinator.delivery import Delivery, acknowledge
from coordinator.models import InferenceRequest, RequestStatus
from coordinator.settlement import fail_request
from coordinator.write_behind import WriteBehind

log = logging.getLogger(__name__)

ACK_WAIT_S = 5.0  # the longest a usage chunk waits for its ending to be written


@dataclass(frozen=True)
class Ending:
    request_id: str
    written: int
    delivery: Delivery | None  # None: the buyer left


class Endings(WriteBehind):
    name = "endings"

    def __init__(self, rt) -> None:
        self.rt = rt
        super().__init__()

    def _empty(self) -> list[tuple[Ending, Future]]:
        return []

    def add(self, ending: Ending, executor: Executor | None = None, loop=None) -> Future:
        """Queue `ending` (written with the others that end meanwhile). The future says
        whether it was written (True) once that is known."""
        written: Future = Future()
        self._submit(lambda queue: queue.append((ending, written)), executor, loop)
        return written

    def _write_batch(self, batch: list[tuple[Ending, Future]]) -> None:
        ok: set[int] = set()
        try:
            with writes_first():  # the buyers' usage chunks wait on it (db.writes_first)
                self._write([e for e, _ in batch], ok)
        except Exception:  # noqa: BLE001 - the sweep settles unacknowledged receipts later
            log.exception("recording how %d request(s) ended failed", len(batch))
            ok = set()
        for k, (_, written) in enumerate(batch):
            if not written.done():  # a future its waiter cancelled stays so (and must not stop this loop)
                try:
                    written.set_result(k in ok)
                except InvalidStateError:
                    pass

    def _write(self, batch: list[Ending], ok: set[int]) -> None:
        """Write `batch`; `ok` gets the index of each ending that is in the database once
        this returns. All of them in a few statements (`_record_all`); if that fails, each
        in a savepoint of its own, so one bad ending holds back nobody."""
        try:
            with self.rt.session() as s:
                outcomes = _record_all(s, batch)
        except Exception:  # noqa: BLE001 - find the bad one: one savepoint each
            log.warning("writing %d endings together failed; writing each alone", len(batch), exc_info=True)
            outcomes = self._write_each(batch)
        ready: list[str] = []
        cancels: list[tuple[str, str]] = []
        for k, outcome in outcomes.items():
            ok.add(k)
            if outcome is None:
                continue
            is_ready, node_id = outcome
            e = batch[k]
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

    def _write_each(self, batch: list[Ending]) -> dict[int, tuple[bool, str | None] | None]:
        out: dict[int, tuple[bool, str | None] | None] = {}
        with self.rt.session() as s:
            for k, e in enumerate(batch):
                try:
                    with s.begin_nested():
                        out[k] = _record(s, e)
                except Exception:  # noqa: BLE001 - the sweep settles it as unacknowledged
                    log.exception("request %s: recording its delivery failed", e.request_id)
        return out


def _record_all(s, batch: list[Ending]) -> dict[int, tuple[bool, str | None] | None]:
    """Every ending of `batch` in one locking read (rows in id order, like every other
    multi-row locker) and one batched update: a handful of round trips for the batch instead
    of four per ending, which on PostgreSQL under load (each round trip waiting for the GIL)
    cost ~17 ms per ending and held every stream's usage chunk back. Same rules as `_record`
    (the first acknowledgement wins); a request still QUEUED goes through `_record`."""
    table = InferenceRequest.__table__
    ids = sorted({e.request_id for e in batch})
    rows = {r.id: r for r in s.execute(
        select(table.c.id, table.c.status, table.c.node_id, table.c.delivery)
        .where(table.c.id.in_(ids)).order_by(table.c.id).with_for_update())}
    out: dict[int, tuple[bool, str | None] | None] = {}
    updates, seen = [], set()
    for k, e in enumerate(batch):
        row = rows.get(e.request_id)
        status = None if row is None else RequestStatus(row.status)
        if row is None or status.finished or row.delivery is not None or e.request_id in seen:
            out[k] = None
        elif status == RequestStatus.QUEUED:
            out[k] = _record(s, e)
        else:
            seen.add(e.request_id)
            delivery = e.delivery or Delivery.BUYER_GONE
            updates.append({"rid": e.request_id, "written": max(0, int(e.written)), "delivery": delivery.value})
            out[k] = (status == RequestStatus.SETTLING, row.node_id)
    if updates:
        s.execute(update(table).where(table.c.id == bindparam("rid"))
                  .values(delivered_tokens=bindparam("written"), delivery=bindparam("delivery")), updates)
    return out


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


async def acknowledged(*done: Future, timeout_s: float = ACK_WAIT_S) -> None:
    """Wait until these endings are written, before the buyer is told what it was charged
    (the usage chunk): a process that died between the two would have told the buyer a
    cost the sweep then settles as unacknowledged, charging nothing. Bounded: a database
    that does not answer delays the usage chunk by `timeout_s` at most."""
    try:  # shielded: a buyer who hangs up (or the timeout) cancels this wait, never the write
        await asyncio.wait_for(asyncio.shield(asyncio.gather(*(asyncio.wrap_future(d) for d in done))), timeout_s)
    except asyncio.TimeoutError:
        log.warning("%d ending(s) not written within %.1fs; sending usage anyway", len(done), timeout_s)
