"""Evidence across a node's audits: catching int8 weights served as bf16.

One audit cannot tell int8 weights from honest bf16 noise: their log-prob differences to
an fp32 reference overlap, and a tolerance wide enough for every honest bf16 job passes
most int8 ones (bench/verify.py: about 95 %). Across audits they separate. Each audit gives
a log-likelihood ratio — per claimed token, log p_int8(|Δ|) / p_bf16(|Δ|) from a histogram
of the per-token |Δ log-prob| (scaled by the model's noise factor), clipped per token and
per audit so no single outlier decides — and a CUSUM sums them (never below 0). When it
crosses `threshold`, the node's declared precision is refuted.

Applies where the evidence was calibrated: the node declares bfloat16 or float16 with no
quantisation and the verifier computed in float32. `calibrate(...)` rebuilds the weights
from honest and int8 jobs (bench/verify.py does, on its calibration seeds); the constants
below are its output on the tiny model, request seeds 9000.. (4 × 200 jobs each), and
bench/verify.py measures them on other seeds (`int8_as_bf16_jobs_to_detect`,
`precision_false_alarms_per_audit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# Per-token |Δ log-prob| bins (nats, after dividing by the model's noise factor) and each
# bin's log p_int8 / p_bf16.
BIN_EDGES = (0.0, 0.01, 0.02, 0.04, 0.07, 0.1, 0.15, 0.2, 0.3, 0.45, 0.7, 1.0, 1.5)
INT8_VS_BF16 = (-0.285, -0.22, -0.314, -0.152, -0.108, -0.046, 0.214, 0.463, 0.933, 1.401, 1.957, 2.485, 1.54)
TOKEN_CLIP = 1.5
AUDIT_CLIP = 6.0
THRESHOLD = 15.0
APPLIES_TO = ("bfloat16", "float16")


@dataclass(frozen=True)
class PrecisionEvidence:
    edges: Sequence[float] = BIN_EDGES
    weights: Sequence[float] = INT8_VS_BF16
    token_clip: float = TOKEN_CLIP
    audit_clip: float = AUDIT_CLIP
    threshold: float = THRESHOLD

    def applies(self, node_dtype: str | None, node_quantization: str | None, verifier_dtype: str | None) -> bool:
        return node_dtype in APPLIES_TO and not node_quantization and verifier_dtype == "float32"

    def audit_llr(self, claimed: Sequence[float], reference: Sequence[float], noise_scale: float = 1.0) -> float:
        """Evidence of one audit (positive: looks like int8), from both log-prob vectors."""
        total = 0.0
        for c, r in zip(claimed, reference):
            d = abs(float(c) - float(r)) / max(noise_scale, 1e-9)
            k = _bin(self.edges, d)
            total += max(-self.token_clip, min(self.token_clip, self.weights[k]))
        return max(-self.audit_clip, min(self.audit_clip, total))

    def update(self, cusum: float, llr: float) -> tuple[float, bool]:
        """(new CUSUM, whether it crossed the threshold); the caller resets it after an alarm."""
        s = max(0.0, cusum + llr)
        return s, s > self.threshold


def _bin(edges: Sequence[float], d: float) -> int:
    lo, hi = 0, len(edges) - 1
    if d >= edges[hi]:
        return hi
    while lo < hi:  # the last edge <= d
        mid = (lo + hi + 1) // 2
        if edges[mid] <= d:
            lo = mid
        else:
            hi = mid - 1
    return lo


def calibrate(honest: Sequence[Sequence[float]], cheat: Sequence[Sequence[float]],
              edges: Sequence[float] = BIN_EDGES) -> tuple[float, ...]:
    """Bin weights from per-token |Δ| of honest and int8 jobs (already divided by the noise
    factor): log of the two smoothed bin frequencies."""
    def freq(jobs):
        counts = [1.0] * len(edges)  # add-one smoothing: no bin is impossible
        for job in jobs:
            for d in job:
                counts[_bin(edges, abs(d))] += 1
        total = sum(counts)
        return [c / total for c in counts]

    f0, f1 = freq(honest), freq(cheat)
    return tuple(round(math.log(b / a), 3) for a, b in zip(f0, f1))


def jobs_to_alarm(llrs: Sequence[float], threshold: float = THRESHOLD) -> int | None:
    """Audits until the CUSUM over `llrs` (in order) crosses `threshold`; None if it never does."""
    s = 0.0
    for i, v in enumerate(llrs):
        s = max(0.0, s + v)
        if s > threshold:
            return i + 1
    return None
