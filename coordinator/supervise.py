"""Keep a child process running: restart it when it exits on its own, with backoff.

`agora worker` runs the Celery worker under this by default. Celery waits out a broker
outage itself (`broker_connection_max_retries=None`), but a worker can still die with the
connection (kombu has raised from `_connparams` when the broker vanished mid-call); with no
worker nothing is dispatched, settled or swept, so the parent starts a new one. SIGTERM
and SIGINT go to the child and end the supervision once it has stopped.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time


def supervise(cmd: list[str], *, base_delay_s: float = 1.0, max_delay_s: float = 30.0,
              healthy_after_s: float = 60.0, name: str = "worker") -> int:
    stopping = False
    child: subprocess.Popen | None = None

    def _stop(signum, _frame):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    failures = 0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(cmd)
        code = child.wait()
        if stopping:
            return 0
        failures = 0 if time.monotonic() - started >= healthy_after_s else failures + 1
        delay = min(max_delay_s, base_delay_s * 2 ** max(0, failures - 1))
        print(f"agora {name}: the {name} exited with code {code}; restarting it in {delay:.1f}s",
              file=sys.stderr, flush=True)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not stopping:
            time.sleep(0.05)
        if stopping:
            return 0
