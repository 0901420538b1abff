"""Prometheus metrics of every Agora process: `GET /metrics` on an API process, a port of its
own on `agora worker` (`AGORA_WORKER_METRICS_PORT`, `serve_worker_metrics`).

Two kinds of series:

- **Recorded where they happen** (per process, on `scheduler.metrics.REGISTRY`): buyer
  requests by outcome, tokens relayed, time to first token and between tokens, queue wait
  (here); dispatch and settle batches, task failures (`scheduler/metrics.py`). Sum them over
  processes.
- **Read from the database at scrape time** (`MarketCollector`): ledger volume, fees and
  open holds, settlements, audits by verdict and reason, routable nodes by engine and region,
  the ask-price index, slots, requests by state. A few aggregate queries (one GROUP BY each)
  per scrape; every process scraped tells the same truth, so dashboards take `max` over
  instances, never `sum`.

Labels are bounded: HTTP statuses, states, verdicts and reasons the code names; models,
regions and engines up to `metrics_max_label_values` (the rest as `other`). Per-node series
(a `node` label) only with `AGORA_METRICS_PER_NODE=true`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func
from sqlmodel import col, select

from coordinator.models import Audit, InferenceRequest, Node, NodeOffer, RequestStatus
from coordinator.routability import candidates
from pricing.ledger_models import HoldState, LedgerHold, LedgerTransfer
from scheduler.metrics import REGISTRY

log = logging.getLogger(__name__)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_GAPS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter("agora_requests_total", "Buyer requests by outcome (the HTTP status answered)", ["outcome"],
                   registry=REGISTRY)
TOKENS = Counter("agora_tokens_relayed_total", "Completion tokens relayed to buyers", registry=REGISTRY)
TTFT = Histogram("agora_ttft_seconds", "Time from a buyer's request to its first token", buckets=_LATENCY,
                 registry=REGISTRY)
INTER_TOKEN = Histogram("agora_inter_token_seconds", "Time between tokens relayed to a buyer (per chunk: the "
                        "gap since the previous chunk over its tokens)", buckets=_GAPS, registry=REGISTRY)
QUEUE_WAIT = Histogram("agora_queue_wait_seconds", "Time from admission to assignment: inline (placed at "
                       "admission), batch (a dispatch round), failover (re-placed after a failed node)",
                       ["path"], buckets=_LATENCY, registry=REGISTRY)
for _p in ("inline", "batch", "failover"):
    QUEUE_WAIT.labels(path=_p)

ACTIVE = (RequestStatus.ASSIGNED, RequestStatus.RUNNING)
IN_FLIGHT = (RequestStatus.ASSIGNED, RequestStatus.RUNNING, RequestStatus.SETTLING)
FINISHED = (RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.REJECTED, RequestStatus.CANCELLED)
QUANTILES = (0.1, 0.5, 0.9)


def observe_gap(prev: float | None, count: int) -> float:
    """Record the gap since `prev` (monotonic) spread over the chunk's `count` tokens; the
    time now, for the next chunk."""
    now = time.monotonic()
    if prev is not None and count > 0:
        INTER_TOKEN.observe((now - prev) / count)
    return now


def observe_queue_wait(created_at, assigned_at, failover: bool = False, inline: bool = False) -> None:
    if created_at is None or assigned_at is None:
        return
    if (created_at.tzinfo is None) != (assigned_at.tzinfo is None):  # one read back from SQLite: both UTC
        created_at, assigned_at = created_at.replace(tzinfo=None), assigned_at.replace(tzinfo=None)
    path = "failover" if failover else "inline" if inline else "batch"
    QUEUE_WAIT.labels(path=path).observe(max(0.0, (assigned_at - created_at).total_seconds()))


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def bounded(tally: Tally, limit: int) -> dict[str, str]:
    """Label value for each key: the `limit` most common keep their name, the rest `other`."""
    keep = {k for k, _ in tally.most_common(limit)}
    return {k: (k if k in keep else "other") for k in tally}


def _reason(verdict_reason: str | None, status: str) -> str:
    if status == "expired":
        return "no_verifier"
    if not verdict_reason:
        return "none"
    r = str(verdict_reason)
    return r if len(r) <= 40 and r.replace("_", "").isalnum() else "other"


class MarketCollector:
    """The market as the database has it, read at each scrape (see the module's docstring)."""

    def __init__(self, rt):
        self.rt = rt

    def collect(self):
        t0 = time.perf_counter()
        up = GaugeMetricFamily("agora_metrics_db_up", "1 if this scrape read the market from the database")
        try:
            with self.rt.read_session() as s:
                families = list(self._families(s))
        except Exception:  # a database outage must not take the process metrics down with it
            log.warning("metrics: could not read the market from the database", exc_info=True)
            families = []
        up.add_metric([], 1.0 if families else 0.0)
        yield from families
        yield up
        took = GaugeMetricFamily("agora_metrics_db_seconds", "Time this scrape spent reading the database")
        took.add_metric([], time.perf_counter() - t0)
        yield took

    def _families(self, s):
        settings = self.rt.settings
        limit = settings.metrics_max_label_values
        # 1. requests by state: queue depth, in flight, finished, settlements, settled tokens
        by_status = {RequestStatus(st): (n, ct or 0, pt or 0) for st, n, ct, pt in s.exec(
            select(InferenceRequest.status, func.count(), func.sum(InferenceRequest.completion_tokens),
                   func.sum(InferenceRequest.prompt_tokens)).group_by(InferenceRequest.status)).all()}
        queued = GaugeMetricFamily("agora_requests_queued", "Requests waiting for a node")
        queued.add_metric([], by_status.get(RequestStatus.QUEUED, (0, 0, 0))[0])
        flight = GaugeMetricFamily("agora_requests_in_flight", "Requests assigned, running or being settled",
                                   labels=["status"])
        for st in IN_FLIGHT:
            flight.add_metric([st.value], by_status.get(st, (0, 0, 0))[0])
        finished = CounterMetricFamily("agora_requests_finished_total", "Requests that ended, by how",
                                       labels=["status"])
        for st in FINISHED:
            finished.add_metric([st.value], by_status.get(st, (0, 0, 0))[0])
        done = by_status.get(RequestStatus.COMPLETED, (0, 0, 0))
        settlements = CounterMetricFamily("agora_settlements_total", "Requests settled: paid on the ledger "
                                          "for the tokens delivered (status completed)")
        settlements.add_metric([], done[0])
        tokens = CounterMetricFamily("agora_settled_tokens_total", "Tokens of settled requests", labels=["kind"])
        tokens.add_metric(["prompt"], done[2])
        tokens.add_metric(["completion"], done[1])
        yield from (queued, flight, finished, settlements, tokens)

        # 2. the ledger: volume (posted holds), holds open, transfers by kind (fees among them)
        holds = {HoldState(st): (n, amount or 0, posted or 0) for st, n, amount, posted in s.exec(
            select(LedgerHold.state, func.count(), func.sum(LedgerHold.amount), func.sum(LedgerHold.posted_amount))
            .group_by(LedgerHold.state)).all()}
        volume = CounterMetricFamily("agora_ledger_volume_nano_usd", "Charged to buyers: the posted part of "
                                     "every settled escrow hold (nano-USD)")
        volume.add_metric([], holds.get(HoldState.POSTED, (0, 0, 0))[2])
        open_n = GaugeMetricFamily("agora_holds_open", "Escrow holds pending (requests not yet settled or voided)")
        open_n.add_metric([], holds.get(HoldState.PENDING, (0, 0, 0))[0])
        open_amount = GaugeMetricFamily("agora_holds_open_nano_usd", "Buyers' money held in pending escrow holds")
        open_amount.add_metric([], holds.get(HoldState.PENDING, (0, 0, 0))[1])
        by_kind = {k: int(a or 0) for k, a in s.exec(
            select(LedgerTransfer.kind, func.sum(LedgerTransfer.amount)).group_by(LedgerTransfer.kind)).all()}
        fees = CounterMetricFamily("agora_ledger_fees_nano_usd", "Platform fees taken from settlements (nano-USD)")
        fees.add_metric([], by_kind.get("fee", 0))
        transfers = CounterMetricFamily("agora_ledger_transfers_nano_usd", "Ledger transfers by kind (deposit, "
                                        "hold, earning, fee, release, void, payout, slash, relay_loss, ...)",
                                        labels=["kind"])
        kinds, summed = bounded(Tally(by_kind), limit), Tally()
        for kind, amount in by_kind.items():
            summed[kinds[kind]] += amount
        for label, amount in sorted(summed.items()):
            transfers.add_metric([label], amount)
        yield from (volume, open_n, open_amount, fees, transfers)

        # 3. audits: verdicts (with the first reason of a failure) and those still open
        reason_expr = col(Audit.verdict)[("reasons", 0)].as_string()
        audits: dict[tuple[str, str], int] = defaultdict(int)
        open_audits: dict[str, int] = defaultdict(int)
        for st, reason, n in s.exec(select(Audit.status, reason_expr, func.count())
                                    .group_by(Audit.status, reason_expr)).all():
            st = st.value if hasattr(st, "value") else str(st)
            if st in ("pending", "sent"):
                open_audits[st] += n
            else:
                audits[(st, _reason(reason if st == "failed" else None, st))] += n
        verdicts = CounterMetricFamily("agora_audits_total", "Audits judged or expired, by verdict "
                                       "(passed, failed, expired) and reason (a failure's first)",
                                       labels=["verdict", "reason"])
        for v in ("passed", "failed", "expired"):
            if not any(k[0] == v for k in audits):
                audits[(v, "no_verifier" if v == "expired" else "none")] += 0
        for (v, r), n in sorted(audits.items()):
            verdicts.add_metric([v, r], n)
        pending = GaugeMetricFamily("agora_audits_open", "Audits waiting for a verifier (pending) or with "
                                    "one (sent)", labels=["status"])
        for st in ("pending", "sent"):
            pending.add_metric([st], open_audits.get(st, 0))
        yield from (verdicts, pending)

        # 4. nodes and offers buyers can be routed to now
        routable = candidates(s, settings, allow_unverified=True)
        nodes = {c.node.id: c.node for c in routable}
        pairs = Tally((n.engine, n.region) for n in nodes.values())
        engines = bounded(Tally(n.engine for n in nodes.values()), limit)
        regions = bounded(Tally(n.region for n in nodes.values()), limit)
        by_pair: Tally = Tally()
        for (engine, region), n in pairs.items():
            by_pair[(engines[engine], regions[region])] += n
        fam = GaugeMetricFamily("agora_nodes_routable", "Nodes buyers can be routed to now, by engine and region",
                                labels=["engine", "region"])
        for (engine, region), n in sorted(by_pair.items()):
            fam.add_metric([engine, region], n)
        online = GaugeMetricFamily("agora_nodes_online", "Nodes buyers can be routed to now (live, healthy, "
                                   "staked): all engines and regions")
        online.add_metric([], len(nodes))
        yield from (fam, online)
        capacity = sum(n.max_concurrency for n in nodes.values())
        busy = sum(by_status.get(st, (0, 0, 0))[0] for st in ACTIVE)
        slots = GaugeMetricFamily("agora_slots", "Request slots of routable nodes (capacity) and requests on "
                                  "nodes now (busy); utilisation = busy / capacity", labels=["state"])
        slots.add_metric(["capacity"], capacity)
        slots.add_metric(["busy"], busy)
        yield slots
        models = bounded(Tally(c.offer.model for c in routable), limit)
        asks: dict[tuple[str, str], list[float]] = defaultdict(list)
        speeds: dict[str, list[float]] = defaultdict(list)
        for c in routable:
            m = models[c.offer.model]
            asks[(m, "in")].append(c.offer.price_in)
            asks[(m, "out")].append(c.offer.price_out)
            speeds[m].append(c.offer.measured_tokens_per_s or c.offer.tokens_per_s)
        price = GaugeMetricFamily("agora_ask_price_nano_usd", "Ask-price index of routable offers, per model: "
                                  "quantiles of nano-USD per million tokens (side: in = prompt, out = completion)",
                                  labels=["model", "side", "quantile"])
        for (m, side), xs in sorted(asks.items()):
            for q in QUANTILES:
                price.add_metric([m, side, str(q)], _quantile(xs, q))
        speed = GaugeMetricFamily("agora_offer_tokens_per_second", "Measured decode speed of routable offers per "
                                  "stream (advertised until measured), quantiles per model",
                                  labels=["model", "quantile"])
        offers = GaugeMetricFamily("agora_offers_routable", "Routable offers per model", labels=["model"])
        for m, xs in sorted(speeds.items()):
            offers.add_metric([m], len(xs))
            for q in QUANTILES:
                speed.add_metric([m, str(q)], _quantile(xs, q))
        yield from (price, speed, offers)
        if settings.metrics_per_node:
            yield from self._per_node(s, set(nodes))

    def _per_node(self, s, routable_ids: set[str]):
        """One series per registered node (behind `metrics_per_node`)."""
        active = dict(s.exec(select(InferenceRequest.node_id, func.count())
                             .where(col(InferenceRequest.status).in_(ACTIVE))
                             .group_by(InferenceRequest.node_id)).all())
        up = GaugeMetricFamily("agora_node_routable", "1 if buyers can be routed to the node now", labels=["node"])
        rep = GaugeMetricFamily("agora_node_reputation", "The node's reputation (0..1)", labels=["node"])
        busy = GaugeMetricFamily("agora_node_active_requests", "Requests on the node now", labels=["node"])
        jobs = CounterMetricFamily("agora_node_jobs_total", "Requests the node completed", labels=["node"])
        audits = CounterMetricFamily("agora_node_audits_total", "The node's audits by verdict",
                                     labels=["node", "verdict"])
        price = GaugeMetricFamily("agora_node_price_nano_usd", "The node's ask per million tokens",
                                  labels=["node", "model", "side"])
        speed = GaugeMetricFamily("agora_node_tokens_per_second", "The node's measured per-stream decode speed "
                                  "(advertised until measured)", labels=["node", "model"])
        for node in s.exec(select(Node)).all():
            up.add_metric([node.id], 1.0 if node.id in routable_ids else 0.0)
            rep.add_metric([node.id], node.reputation)
            busy.add_metric([node.id], active.get(node.id, 0))
            jobs.add_metric([node.id], node.jobs)
            audits.add_metric([node.id, "passed"], node.audits_passed)
            audits.add_metric([node.id, "failed"], node.audits_failed)
        for offer in s.exec(select(NodeOffer)).all():
            price.add_metric([offer.node_id, offer.model, "in"], offer.price_in)
            price.add_metric([offer.node_id, offer.model, "out"], offer.price_out)
            speed.add_metric([offer.node_id, offer.model], offer.measured_tokens_per_s or offer.tokens_per_s)
        yield from (up, rep, busy, jobs, audits, price, speed)


class _Recorded:
    """This process's own instruments (scheduler.metrics.REGISTRY) as one collector."""

    def collect(self):
        yield from REGISTRY.collect()


def registry_for(rt) -> CollectorRegistry:
    """What a scrape of this process returns: its own instruments and the market."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Recorded())
    reg.register(MarketCollector(rt))
    return reg


def render(rt) -> bytes:
    return generate_latest(registry_for(rt))


_served: dict[int, object] = {}


def serve_worker_metrics(rt, port: int | None = None, host: str | None = None):
    """Serve this process's metrics on `port` (a worker's; `AGORA_WORKER_METRICS_PORT`), once
    per process; None when off (port 0) or the port is taken (logged: the worker runs on)."""
    from prometheus_client import start_http_server

    port = rt.settings.worker_metrics_port if port is None else port
    if not port:
        return None
    if port in _served:
        return _served[port]
    try:
        server, _thread = start_http_server(port, addr=host or rt.settings.worker_metrics_host,
                                            registry=registry_for(rt))
    except OSError as exc:
        log.warning("worker metrics not served on port %s: %s", port, exc)
        return None
    _served[port] = server
    return server
