"""Writes that run behind the request path, batched: whatever is added while a write runs is
taken, all together, by the next one, in one worker thread at a time. `endings.py` (what
each buyer was written) and `job_counts.py` (nodes' job counters) are the two."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Executor
from typing import Callable

log = logging.getLogger(__name__)


class WriteBehind:
    name = "write-behind"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = self._empty()
        self._running = False
        self._idle = threading.Event()
        self._idle.set()

    def _empty(self):
        """A new, empty buffer (a list, a Counter...)."""
        raise NotImplementedError

    def _write_batch(self, batch) -> None:
        """Write one batch (a buffer taken whole); errors are the subclass's to handle."""
        raise NotImplementedError

    def _submit(self, put: Callable, executor: Executor | None = None, loop=None) -> None:
        """`put(buffer)` under the lock; a write starts in a worker thread (the loop's
        executor when given) unless one is running: that one takes it next."""
        with self._lock:
            put(self._buffer)
            if self._running:
                return
            self._running = True
            self._idle.clear()
        if loop is not None:
            loop.run_in_executor(executor, self._drain)
        else:
            threading.Thread(target=self._drain, name=self.name, daemon=True).start()

    def pending(self) -> int:
        with self._lock:
            return len(self._buffer)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything added so far is written (tests, shutdown)."""
        return self._idle.wait(timeout)

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch, self._buffer = self._buffer, self._empty()
                if not batch:
                    self._running = False
                    self._idle.set()
                    return
            try:
                self._write_batch(batch)
            except Exception:  # noqa: BLE001 - a bug in a writer must not stop the ones after it
                log.exception("%s: a batch of %d failed", self.name, len(batch))
