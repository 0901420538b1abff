"""The embedded coordinator's broker: kombu's in-memory transport, woken when a message
arrives instead of polling.

kombu's `memory://` worker loop tries every queue, finds nothing, sleeps `polling_interval`
and tries again. Polled every 2 ms (so that a dispatch or settle task starts at once), that
loop cost the embedded coordinator about 5 ms of CPU per served request, on the same GIL as
the requests themselves (`bench/OVERHEAD.md`). Here a put wakes the waiting consumer; the
wait is bounded (`FALLBACK_S`) only so that a worker asked to stop notices.

Messages still pass only between threads of one process, like `memory://`, whose URL and
queues this keeps (`configure` points the `memory` alias here).
"""

from __future__ import annotations

import socket
import threading
from queue import Empty
from time import monotonic

from kombu.transport import memory

FALLBACK_S = 0.5


class _Wake:
    """A generation counter: a consumer waits until something was put since it looked."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.gen = 0

    def notify(self) -> None:
        with self._cond:
            self.gen += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.gen != seen, timeout)


WAKE = _Wake()


class Channel(memory.Channel):
    def _put(self, queue, message, **kwargs):
        super()._put(queue, message, **kwargs)
        WAKE.notify()

    def _put_fanout(self, exchange, message, routing_key=None, **kwargs):
        super()._put_fanout(exchange, message, routing_key, **kwargs)
        WAKE.notify()

    def basic_ack(self, *args, **kwargs):  # frees prefetch room: a consumer may take the next now
        super().basic_ack(*args, **kwargs)
        WAKE.notify()


class Transport(memory.Transport):
    Channel = Channel

    def drain_events(self, connection, timeout=None):
        start = monotonic()
        while True:
            seen = WAKE.gen  # read before looking: a put after this wakes the wait below
            try:
                self.cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                left = FALLBACK_S if timeout is None else timeout - (monotonic() - start)
                if left <= 0:
                    raise socket.timeout() from None
                WAKE.wait(seen, min(left, FALLBACK_S))
