"""One dispatch round: load the snapshot, call the routing policy, store the decision.

The store is an interface the coordinator implements on its database (the scheduler does
not import the coordinator); the round itself is plain code that Celery only wraps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

from scheduler.routing import Decision, NodeState, PendingRequest, get_policy


class DispatchStore(Protocol):
    def pending(self, limit: int) -> list[PendingRequest]:
        """Queued requests, oldest first."""

    def nodes(self, models: set[str]) -> list[NodeState]:
        """Online nodes' offers for these models, with their free slots now."""

    def apply(self, decision: Decision) -> "AppliedDecision":
        """Lock prices and mark assigned (only requests still queued), reject, notify."""

    def settle(self, request_id: str) -> dict:
        """Pay a request whose receipt was accepted; idempotent."""

    def sweep(self) -> dict:
        """Mark silent nodes offline, fail stuck assignments, expire holds."""


@dataclass
class AppliedDecision:
    assigned: int = 0
    rejected: int = 0
    deferred: int = 0
    skipped: int = 0  # decided, but the request was no longer queued (another round took it)


@dataclass
class DispatchReport:
    pending: int
    nodes: int
    applied: AppliedDecision
    route_ms: float


def run_dispatch(store: DispatchStore, policy: str | None = None, limit: int = 10_000) -> DispatchReport:
    requests = store.pending(limit)
    if not requests:
        return DispatchReport(0, 0, AppliedDecision(), 0.0)
    nodes = store.nodes({r.model for r in requests})
    t0 = time.perf_counter()
    decision = get_policy(policy).route(requests, nodes)
    route_ms = (time.perf_counter() - t0) * 1000
    applied = store.apply(decision)
    return DispatchReport(len(requests), len(nodes), applied, route_ms)


_store: DispatchStore | None = None


def set_store(store: DispatchStore | None) -> None:
    """Called once by the process that runs tasks (the coordinator's worker bootstrap)."""
    global _store
    _store = store


def get_store() -> DispatchStore:
    if _store is None:
        raise RuntimeError(
            "no dispatch store configured: start workers with `celery -A coordinator.worker worker`"
        )
    return _store
