"""scheduler.evidence: the per-audit statistic and the CUSUM across a node's audits."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from scheduler.evidence import (
    AUDIT_CLIP,
    BIN_EDGES,
    INT8_VS_BF16,
    P_FLOOR,
    THRESHOLD,
    PrecisionEvidence,
    calibrate,
    jobs_to_alarm,
    token_z,
)

EV = PrecisionEvidence()


def _job(rng: random.Random, scale: float, n: int = 32) -> tuple[list[float], list[float]]:
    """(claimed, reference) log-probs: per token |Δ| = scale × (1 − p) × |Laplace|."""
    ref = [math.log(rng.uniform(0.01, 0.999)) for _ in range(n)]
    claimed = [r + scale * (1 - math.exp(r)) * rng.expovariate(1.0) * rng.choice((-1, 1)) for r in ref]
    return claimed, ref


def test_token_z_divides_by_one_minus_p_and_the_noise_factor():
    z = token_z([-0.7, -2.0, -0.001], [-math.log(2), -2.1, -0.0002], noise_scale=2.0)
    assert z[0] == pytest.approx(abs(-0.7 + math.log(2)) / (2.0 * 0.5))
    assert z[1] == pytest.approx(0.1 / (2.0 * (1 - math.exp(-2.1))))
    assert z[2] == pytest.approx(0.0008 / (2.0 * P_FLOOR))  # near-certain token: the floor
    assert token_z([0.1], [0.05])[0] == pytest.approx(0.05 / P_FLOOR)  # a reference above 0 is p = 1


def test_the_shipped_weights_rise_with_z_and_an_audit_is_bounded():
    assert len(INT8_VS_BF16) == len(BIN_EDGES) and list(BIN_EDGES) == sorted(BIN_EDGES)
    assert INT8_VS_BF16[0] < 0 < INT8_VS_BF16[-1] and INT8_VS_BF16[-1] == max(INT8_VS_BF16)
    far = [r + 5.0 for r in [-1.0] * 500]
    assert EV.audit_llr(far, [-1.0] * 500) == AUDIT_CLIP < THRESHOLD  # no single audit decides
    assert EV.audit_llr([-1.0] * 500, [-1.0] * 500) == -AUDIT_CLIP
    assert EV.audit_llr([], []) == 0.0


def test_confident_tokens_do_not_count_as_evidence_of_honesty_by_their_small_delta():
    # Δ = 0.006 on a token of p = 0.98 is z = 0.3 (int8-like); the same Δ on p = 0.3 is honest.
    confident = EV.audit_llr([math.log(0.98) + 0.006] * 8, [math.log(0.98)] * 8)
    uncertain = EV.audit_llr([math.log(0.3) + 0.006] * 8, [math.log(0.3)] * 8)
    assert confident > 0 > uncertain


def test_honest_and_int8_like_noise_separate_and_the_cusum_catches_only_the_latter():
    rng = random.Random(0)
    honest = [EV.audit_llr(*_job(rng, 0.11 / math.log(2))) for _ in range(400)]  # median z 0.11
    int8 = [EV.audit_llr(*_job(rng, 0.18 / math.log(2))) for _ in range(400)]  # median z 0.18
    assert sum(honest) / 400 < -1 and sum(int8) / 400 > 1
    assert jobs_to_alarm(int8, EV.threshold) is not None and jobs_to_alarm(int8, EV.threshold) <= 20
    assert jobs_to_alarm(honest, EV.threshold) is None


def test_calibrate_recovers_the_log_ratio_of_bin_frequencies():
    rng = random.Random(1)
    honest = [[abs(rng.gauss(0, 0.12)) for _ in range(64)] for _ in range(200)]
    cheat = [[abs(rng.gauss(0, 0.2)) for _ in range(64)] for _ in range(200)]
    w = calibrate(honest, cheat)
    assert len(w) == len(BIN_EDGES) and w[0] < 0 < w[-1]

    def mass(sigma, lo, hi):  # P(lo <= |N(0, sigma)| < hi)
        return math.erf(hi / (sigma * math.sqrt(2))) - math.erf(lo / (sigma * math.sqrt(2)))

    for k, (lo, hi) in enumerate(itertools.pairwise(BIN_EDGES)):
        if hi <= 0.45:  # bins where both sides have counts to speak of
            assert w[k] == pytest.approx(math.log(mass(0.2, lo, hi) / mass(0.12, lo, hi)), abs=0.15)


def test_update_resets_nowhere_below_zero_and_alarms_above_the_threshold():
    s, alarm = EV.update(0.0, -3.0)
    assert (s, alarm) == (0.0, False)
    s, alarm = EV.update(THRESHOLD - 1, 0.5)
    assert not alarm and s == pytest.approx(THRESHOLD - 0.5)
    s, alarm = EV.update(s, 1.0)
    assert alarm


def test_applies_only_where_calibrated():
    assert EV.applies("bfloat16", None, "float32") and EV.applies("float16", "", "float32")
    assert not EV.applies("bfloat16", "int8", "float32")
    assert not EV.applies("float32", None, "float32")
    assert not EV.applies("bfloat16", None, "bfloat16")
