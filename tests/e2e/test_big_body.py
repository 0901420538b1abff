"""A 10 MB request body is refused in well under 100 ms by a real server, and buyers'
small requests meanwhile are as fast as without it."""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest

from tests.e2e.market import embedded_market

pytestmark = pytest.mark.slow


def test_a_ten_megabyte_body_is_refused_at_once_and_slows_nobody(tmp_path):
    with embedded_market(tmp_path) as m:
        key = m.agora("account", "create", "--credit", str(10**9))
        auth = {"Authorization": f"Bearer {key}"}
        small = lambda: httpx.get(m.base + "/v1/account", headers=auth, timeout=10)  # noqa: E731

        def latencies(n: int) -> list[float]:
            out = []
            for _ in range(n):
                t = time.perf_counter()
                assert small().status_code == 200
                out.append(time.perf_counter() - t)
            return out

        quiet = latencies(20)
        big = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * (10 * 2**20) + b'"}]}'
        refusals, stop = [], threading.Event()

        def flood():
            with httpx.Client(timeout=30) as c:
                while not stop.is_set():
                    t = time.perf_counter()
                    r = c.post(m.base + "/v1/chat/completions", content=big,
                               headers={**auth, "Content-Type": "application/json"})
                    refusals.append((r.status_code, time.perf_counter() - t))

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        time.sleep(0.3)
        busy = latencies(20)
        stop.set()
        flooder.join(30)
        assert refusals and all(code == 413 for code, _ in refusals)
        # the server answers before reading the body: what remains is the client sending it
        # over loopback, so the 413 comes back fast
        assert statistics.median(t for _, t in refusals) < 0.1, refusals
        assert statistics.median(busy) < max(3 * statistics.median(quiet), 0.02), (quiet, busy)
