"""Exponential backoff for nodes that failed (stopped streaming, lost the connection).

Pure: the caller passes the clock (`now`, seconds) and owns the `Backoff` object (or
stores `NodeBackoff` rows and rebuilds it). After the k-th consecutive failure a node is
held out of routing for `base_s * factor**(k-1)` seconds (capped at `max_s`, with
deterministic ±`jitter` spread by node id so a fleet that failed together does not come
back together). A success resets the count.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field


@dataclass
class NodeBackoff:
    failures: int = 0
    until: float = 0.0  # not routable before this time
    last_failure: float | None = None


@dataclass
class Backoff:
    base_s: float = 5.0
    factor: float = 2.0
    max_s: float = 600.0
    jitter: float = 0.1  # ± share of the delay
    nodes: dict[str, NodeBackoff] = field(default_factory=dict)

    def delay_s(self, failures: int, node_id: str = "") -> float:
        if failures <= 0:
            return 0.0
        raw = min(self.max_s, self.base_s * self.factor ** (failures - 1))
        spread = (zlib.crc32(f"{node_id}:{failures}".encode()) / 0xFFFFFFFF) * 2.0 - 1.0
        return max(0.0, raw * (1.0 + self.jitter * spread))

    def record_failure(self, node_id: str, now: float) -> float:
        """Mark a failure; returns the time before which the node gets no work."""
        st = self.nodes.setdefault(node_id, NodeBackoff())
        st.failures += 1
        st.last_failure = now
        st.until = now + self.delay_s(st.failures, node_id)
        return st.until

    def record_success(self, node_id: str) -> None:
        st = self.nodes.get(node_id)
        if st is not None:
            st.failures = 0
            st.until = 0.0

    def available(self, node_id: str, now: float) -> bool:
        st = self.nodes.get(node_id)
        return st is None or now >= st.until

    def blocked(self, now: float) -> set[str]:
        """Node ids held back at `now` (to mark `online=False` in the routing snapshot)."""
        return {nid for nid, st in self.nodes.items() if now < st.until}
