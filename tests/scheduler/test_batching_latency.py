from __future__ import annotations

import numpy as np
import pytest

from scheduler.batching import ThroughputCurve, free_slots, stream_speed_after
from scheduler.latency import RttTable, default_rtt_table


def test_throughput_curve_share():
    c = ThroughputCurve(100.0, slowdown_per_stream=0.05, max_batch=64)
    assert c.per_stream(1) == 100.0 and c.aggregate(11) == pytest.approx(11 * 100 / 1.5)
    assert c.max_streams(0.6) == 14  # 1 + (1/0.6 - 1) / 0.05 = 14.3
    assert free_slots(c, active=10) == 4 and free_slots(c, active=20) == 0
    assert ThroughputCurve(100.0, 0.05, max_batch=8).max_streams(0.6) == 8  # memory-bound
    assert c.scaled(0.5).per_stream(1) == 50.0
    assert c.per_stream(14) <= stream_speed_after(c, 0) <= c.per_stream(1)
    fast, slow = ThroughputCurve(100.0, 0.01, 64), ThroughputCurve(30.0, 0.05, 24)
    assert free_slots(fast, 0) > free_slots(slow, 0)


def test_rtt_table():
    t = default_rtt_table()
    assert {"us-east", "us-west", "eu-west", "ap-southeast"} <= set(t.regions)
    assert t.rtt_ms("us-east", "ap-southeast") == 220 and t.rtt_ms("ap-southeast", "us-east") == 220
    assert t.rtt_ms("us-east", "us-east") == 4
    assert t.rtt_ms("mars", "us-east") == t.unknown_ms and t.rtt_ms(None, "us-east") == t.unknown_ms
    m = t.matrix(["us-east", "eu-west", None], ["us-west", "eu-west"])
    assert np.allclose(m, [[65, 75], [140, 4], [t.unknown_ms, t.unknown_ms]])
    assert RttTable.from_rows([("a", "b", 10)]).rtt_ms("b", "a") == 10
