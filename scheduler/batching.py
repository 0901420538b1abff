"""Batching: how many more requests a node should take, from its throughput curve.

With continuous batching a node's aggregate throughput grows with the batch while each
stream slows down. The engine benchmark gives the single-stream speed and the slowdown
per extra stream; measured traffic rescales it (a node delivering 60% of its claim has a
curve 60% as high). A node's share of a dispatch is the number of extra streams it can
take while every stream keeps at least `min_stream_fraction` of its single-stream speed
and the batch fits its memory: fast nodes take more of a burst, slow ones less, and
nobody gets a burst dumped on it beyond what its curve sustains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ThroughputCurve:
    single_stream_tps: float  # tok/s of one stream alone
    slowdown_per_stream: float = 0.02  # per-stream speed = single / (1 + s * (b - 1))
    max_batch: int = 32  # memory limit (KV cache)

    def per_stream(self, batch: int) -> float:
        b = max(1, batch)
        return self.single_stream_tps / (1.0 + self.slowdown_per_stream * (b - 1))

    def aggregate(self, batch: int) -> float:
        return max(1, batch) * self.per_stream(batch)

    def scaled(self, measured_ratio: float) -> ThroughputCurve:
        """The same shape at the measured level (measured ÷ advertised single-stream speed)."""
        return ThroughputCurve(self.single_stream_tps * measured_ratio, self.slowdown_per_stream, self.max_batch)

    def max_streams(self, min_stream_fraction: float) -> int:
        """Largest batch where each stream keeps `min_stream_fraction` of single-stream speed."""
        if self.slowdown_per_stream <= 0:
            return self.max_batch
        b = 1 + (1.0 / min_stream_fraction - 1.0) / self.slowdown_per_stream
        return max(1, min(self.max_batch, math.floor(b + 1e-9)))


def free_slots(curve: ThroughputCurve, active: int, min_stream_fraction: float = 0.6) -> int:
    """Extra streams the node can take now (its share of the next dispatch)."""
    return max(0, curve.max_streams(min_stream_fraction) - active)


def stream_speed_after(curve: ThroughputCurve, active: int, min_stream_fraction: float = 0.6) -> float:
    """Per-stream speed a new request of this dispatch can count on (what the policy should
    see as `tokens_per_s`): the speed midway between the batch now and the fullest batch
    the node's share allows, since the dispatch may fill the share."""
    full = max(active + 1, curve.max_streams(min_stream_fraction))
    return curve.per_stream((active + 1 + full) // 2)
