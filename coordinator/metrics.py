"""Prometheus metrics of the coordinator (`GET /metrics`).

Counters are per process (each API replica exposes its own); gauges that describe the
market (live nodes, queued requests) are read from the database at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import func
from sqlmodel import select

from coordinator.models import InferenceRequest, RequestStatus
from coordinator.routability import routable_node_ids

REGISTRY = CollectorRegistry()
REQUESTS = Counter("agora_requests_total", "Buyer requests by outcome", ["outcome"], registry=REGISTRY)
TOKENS = Counter("agora_tokens_relayed_total", "Completion tokens relayed to buyers", registry=REGISTRY)
TTFT = Histogram("agora_ttft_seconds", "Time from admission to the first token", registry=REGISTRY,
                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
LIVE_NODES = Gauge("agora_nodes_online", "Nodes buyers can be routed to now (live, healthy, staked)",
                   registry=REGISTRY)
QUEUED = Gauge("agora_requests_queued", "Requests waiting for a node", registry=REGISTRY)


def render(rt) -> bytes:
    with rt.session() as s:
        LIVE_NODES.set(len(routable_node_ids(s, rt.settings)))
        QUEUED.set(s.exec(select(func.count()).select_from(InferenceRequest).where(
            InferenceRequest.status == RequestStatus.QUEUED)).one())
    return generate_latest(REGISTRY)
