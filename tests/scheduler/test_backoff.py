from __future__ import annotations

import pytest

from scheduler.backoff import Backoff


def test_exponential_backoff_and_reset():
    b = Backoff(base_s=5.0, factor=2.0, max_s=60.0, jitter=0.0)
    assert b.available("n", 0.0)
    assert b.record_failure("n", 100.0) == pytest.approx(105.0)
    assert not b.available("n", 104.0) and b.available("n", 105.0)
    assert b.record_failure("n", 110.0) == pytest.approx(120.0)
    assert b.record_failure("n", 120.0) == pytest.approx(140.0)
    for _ in range(10):
        until = b.record_failure("n", 200.0)
    assert until == pytest.approx(260.0)  # capped
    assert b.blocked(201.0) == {"n"}
    b.record_success("n")
    assert b.available("n", 201.0) and b.blocked(201.0) == set()


def test_jitter_is_bounded_and_deterministic():
    b = Backoff(base_s=10.0, jitter=0.1)
    delays = [b.delay_s(1, f"node-{i}") for i in range(50)]
    assert all(9.0 <= d <= 11.0 for d in delays)
    assert len(set(delays)) > 10
    assert delays == [b.delay_s(1, f"node-{i}") for i in range(50)]
