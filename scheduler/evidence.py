"""Evidence across a node's audits: catching int8 weights served as bf16.

One audit cannot tell int8 weights from honest bf16 noise: their log-prob differences to
an fp32 reference overlap, and a tolerance wide enough for every honest bf16 job passes
most int8 ones (bench/verify.py: about 95 %). Across audits they separate. Each audit gives
a log-likelihood ratio and a CUSUM sums them (never below 0); when it crosses `threshold`,
the node's declared precision is refuted.

Per claimed token the statistic is z = |Δ log-prob| / (noise factor × (1 − p)), p the
reference probability of the token. Weight noise moves every logit a little; the token's
log-prob moves by its own logit's change less the probability-weighted mean of all of them,
so a near-certain token (p → 1) barely moves under any precision. Divided by 1 − p, the
differences of honest bf16 and of int8 are each one scale family (median z about 0.11 and
0.18 on the tiny model, whatever p) instead of a mixture dominated by confident tokens —
which made most tokens look honest whatever the weights. Each token adds log p_int8(z) /
p_bf16(z) from a histogram (`BIN_EDGES`, `INT8_VS_BF16`), clipped; the sum is multiplied by
`TOKEN_SHARE` (tokens of one job are not independent: at 1/2, E_bf16[exp(llr)] ≈ 0.8, so the
audit's figure is about a true log-likelihood ratio) and clipped per audit so no single
audit decides (`AUDIT_CLIP` 6 against `THRESHOLD` 11: two audits at the very least).

Applies where the evidence was calibrated: the node declares bfloat16 or float16 with no
quantisation and the verifier computed in float32. `calibrate(...)` rebuilds the weights
from honest and int8 jobs; the constants below are its output on the tiny model (bf16
compute, int8 per group of 64), request seeds 9000.., 9200.., 9400.., 9600.. (1600 jobs,
51 169 tokens per side). bench/verify.py measures them on other seeds (12000..:
`int8_as_bf16_jobs_to_detect`, `precision_false_alarms_per_audit`). Offline, on 1 700 jobs
per side of seeds 12000..16017: p99 12 audits to detect (the statistic before, |Δ| not
divided by 1 − p: 20), about 1.5e-6 false alarms per honest bf16 audit (2e-6 at batch 1 and
8; float16 nodes never alarm; tiny-20m with its noise factor: none, and int8 caught within
13). Not a target: int8 weights with float32 compute (noise close to bf16's; about 60 %
within 20 audits) and groups of 32 (p99 20).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Per-token z bins (lower edges) and each bin's log p_int8 / p_bf16.
BIN_EDGES = (0.0, 0.02, 0.04, 0.06, 0.08, 0.11, 0.14, 0.17, 0.21, 0.26, 0.33, 0.45, 0.7)
INT8_VS_BF16 = (-0.485, -0.46, -0.447, -0.444, -0.29, -0.244, -0.156, 0.0, 0.172, 0.423, 0.767, 1.25, 1.942)
P_FLOOR = 0.02  # 1 − p below this counts as this (log-probs travel rounded to 1e-4)
TOKEN_CLIP = 2.0
TOKEN_SHARE = 0.5
AUDIT_CLIP = 6.0
THRESHOLD = 11.0
APPLIES_TO = ("bfloat16", "float16")


def token_z(claimed: Sequence[float], reference: Sequence[float], noise_scale: float = 1.0) -> list[float]:
    """Per token |Δ log-prob| / (noise factor × (1 − p_reference))."""
    k = max(noise_scale, 1e-9)
    out = []
    for c, r in zip(claimed, reference):
        r = float(r)
        q = 1.0 - math.exp(min(r, 0.0))
        out.append(abs(float(c) - r) / (k * max(q, P_FLOOR)))
    return out


@dataclass(frozen=True)
class PrecisionEvidence:
    edges: Sequence[float] = BIN_EDGES
    weights: Sequence[float] = INT8_VS_BF16
    token_clip: float = TOKEN_CLIP
    token_share: float = TOKEN_SHARE
    audit_clip: float = AUDIT_CLIP
    threshold: float = THRESHOLD

    def applies(self, node_dtype: str | None, node_quantization: str | None, verifier_dtype: str | None) -> bool:
        return node_dtype in APPLIES_TO and not node_quantization and verifier_dtype == "float32"

    def audit_llr(self, claimed: Sequence[float], reference: Sequence[float], noise_scale: float = 1.0) -> float:
        """Evidence of one audit (positive: looks like int8), from both log-prob vectors."""
        total = 0.0
        for z in token_z(claimed, reference, noise_scale):
            if math.isnan(z):
                continue
            w = self.weights[_bin(self.edges, z)]
            total += max(-self.token_clip, min(self.token_clip, w))
        return max(-self.audit_clip, min(self.audit_clip, self.token_share * total))

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


def calibrate(honest: Iterable[Sequence[float]], cheat: Iterable[Sequence[float]],
              edges: Sequence[float] = BIN_EDGES) -> tuple[float, ...]:
    """Bin weights from the per-token z (`token_z`) of honest and int8 jobs: log of the two
    smoothed bin frequencies."""
    def freq(jobs):
        counts = [1.0] * len(edges)  # add-one smoothing: no bin is impossible
        for job in jobs:
            for z in job:
                counts[_bin(edges, abs(z))] += 1
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
