"""One dispatch round: load the snapshot, call the routing policy, store the decision.

The store is an interface the coordinator implements on its database (the scheduler does
not import the coordinator); the round itself is plain code that Celery only wraps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Protocol

from scheduler.routing import Decision, NodeState, PendingRequest, eligible, get_policy


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
    decision = route_in_groups(get_policy(policy), requests, nodes)
    route_ms = (time.perf_counter() - t0) * 1000
    applied = store.apply(decision)
    return DispatchReport(len(requests), len(nodes), applied, route_ms)


_eligible = eligible  # per-request limits the policy does not know (scheduler.routing.eligible)


def route_in_groups(policy, requests: list[PendingRequest], nodes: list[NodeState]) -> Decision:
    """Route requests that share the same limits together, most restricted first; capacity
    taken by one group is gone for the next. Almost every round is a single group."""
    groups: dict[tuple, list[PendingRequest]] = {}
    for r in requests:
        groups.setdefault((r.allow_unverified, r.max_price_in if r.max_price_in is not None else 2**62,
                           r.quantization or ()), []).append(r)
    if len(groups) == 1:
        reqs = next(iter(groups.values()))
        return policy.route(reqs, [n for n in nodes if _eligible(reqs[0], n)])
    free = {n.id: n.free_slots for n in nodes}
    out = Decision()
    for _, reqs in sorted(groups.items(), key=lambda kv: kv[0]):
        usable = [replace(n, free_slots=free[n.id]) for n in nodes if _eligible(reqs[0], n)]
        d = policy.route(reqs, usable)
        for rid, node_id in d.assignments.items():
            free[node_id] -= 1
        out.assignments.update(d.assignments)
        out.rejections.update(d.rejections)
        out.deferred.extend(d.deferred)
    return out


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
