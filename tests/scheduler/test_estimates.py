"""Measured speed learning: advertised figures seed, relayed traffic decides."""

from __future__ import annotations

import pytest

from scheduler.estimates import N_BUCKETS, SpeedEstimator, prompt_bucket


def test_buckets():
    assert [prompt_bucket(p) for p in (0, 255, 256, 1023, 1024, 4096, 100_000)] == [0, 0, 1, 1, 2, 3, 3]


def test_seed_only_until_traffic():
    est = SpeedEstimator()
    est.seed("n", "m", tokens_per_s=100.0, ttft_ms=50.0)
    assert est.tokens_per_s("n", "m") == 100.0 and est.claim_gap("n", "m") == 0.0
    with pytest.raises(KeyError):
        est.observe("other", "m", 10, 10.0, 10, 100.0)


def test_overclaiming_node_converges_to_measured_speed():
    est = SpeedEstimator()
    est.seed("liar", "m", tokens_per_s=150.0, ttft_ms=40.0)
    for _ in range(20):  # delivers 50 tok/s: 101 tokens in 2 s
        est.observe("liar", "m", prompt_tokens=500, ttft_ms=120.0, output_tokens=101, decode_ms=2000.0)
    assert est.tokens_per_s("liar", "m", 500) == pytest.approx(50.0, rel=0.02)
    assert est.ttft_ms("liar", "m", 500) == pytest.approx(120.0, rel=0.02)
    # buckets it never served borrow the node-wide ratio
    assert est.tokens_per_s("liar", "m", 5000) == pytest.approx(50.0, rel=0.05)
    assert est.claim_ratio("liar", "m") == pytest.approx(1 / 3, rel=0.05)
    assert est.claim_gap("liar", "m") == pytest.approx(2 / 3, rel=0.05)


def test_first_observation_moves_fast_then_ewma():
    est = SpeedEstimator(alpha=0.2, prior_weight=0.5)
    est.seed("n", "m", 100.0, 50.0)
    est.observe("n", "m", 100, 50.0, 51, 1000.0)  # 50 tok/s
    first = est.tokens_per_s("n", "m", 100)
    assert 50.0 < first < 70.0
    for _ in range(50):
        est.observe("n", "m", 100, 50.0, 81, 1000.0)  # drifts to 80 tok/s
    assert est.tokens_per_s("n", "m", 100) == pytest.approx(80.0, rel=0.01)


def test_concurrency_normalises_to_single_stream():
    est = SpeedEstimator()
    est.seed("n", "m", 100.0, 50.0)
    for _ in range(30):  # 11 streams at slowdown 0.05: per-stream 100 / 1.5
        est.observe("n", "m", 100, 50.0, 101, 1500.0, concurrent_streams=11, slowdown_per_stream=0.05)
    assert est.claim_ratio("n", "m") == pytest.approx(1.0, rel=0.01)


def test_node_fields_and_reseed_keeps_learning():
    est = SpeedEstimator()
    est.seed("n", "m", 100.0, 50.0, prefill_tokens_per_s=10_000.0)
    est.observe("n", "m", 100, 60.0, 41, 1000.0)
    f = est.node_fields("n", "m")
    assert len(f["tokens_per_s_by_bucket"]) == N_BUCKETS and f["advertised_tokens_per_s"] == 100.0
    assert f["ttft_ms_by_bucket"][3] > f["ttft_ms_by_bucket"][0]  # longer prompts, more prefill
    learned = est.tokens_per_s("n", "m", 100)
    est.seed("n", "m", 120.0, 50.0)  # new benchmark claim
    assert est.tokens_per_s("n", "m", 100) == learned


def test_state_round_trips_through_json():
    import json

    from scheduler.estimates import SpeedEstimator

    a = SpeedEstimator()
    a.seed("n", "m", tokens_per_s=100.0, ttft_ms=50.0)
    for _ in range(5):
        a.observe("n", "m", prompt_tokens=300, ttft_ms=80.0, output_tokens=21, decode_ms=1000.0)
    b = SpeedEstimator()
    b.import_state("n", "m", json.loads(json.dumps(a.export_state("n", "m"))))
    assert b.node_fields("n", "m") == a.node_fields("n", "m")
    assert b.claim_ratio("n", "m") == a.claim_ratio("n", "m") < 1.0
    assert b.samples("n", "m") == 5
