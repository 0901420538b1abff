"""Discrete-event simulation of the market: a fleet, a trace, and any routing policy.

The same policy objects run here and in the dispatch task. Each dispatch micro-batch
(`window_ms` after the first waiting request, or when a slot frees) builds `NodeState`s
exactly as production should: speed and TTFT from the `SpeedEstimator` learned from
relayed (simulated) traffic, free slots from the node's measured throughput curve
(`scheduler.batching`), failed nodes held out by `Backoff`. Requests a node drops when
it fails are continued elsewhere from the tokens already delivered.

Multi-turn conversations (`traces.conversation_trace`): a turn arrives its think time after
the previous turn ended. With `prefix_cache` every node keeps the KV cache of a bounded
number of conversations (an int: that many; True: as many as half its KV memory holds,
`PREFIX_CACHE_SHARE`; LRU; lost when the node fails): a turn on a node that holds its conversation
prefills only what is new. With `affinity` the router is told, like the coordinator's
prefix map (coordinator/affinity.py), which node served each conversation's last turn and
how many prompt tokens it had (`PendingRequest.cached_tokens`), forgotten after
`affinity_ttl_ms`; it does not know what the node has evicted since.

Deterministic for a given fleet, trace and seed.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np

from scheduler.backoff import Backoff
from scheduler.batching import ThroughputCurve, free_slots
from scheduler.estimates import SpeedEstimator
from scheduler.sim.fleet import SimNode
from scheduler.latency import RttTable, default_rtt_table
from scheduler.routing import NodeState, PendingRequest, RoutingPolicy
from scheduler.sim.traces import SimRequest

COORDINATOR_REGION = "us-east"
MODEL = "llama-8b"
MIN_STREAM_FRACTION = 0.6
PREFIX_CACHE_SHARE = 0.5  # of a node's KV memory kept for finished conversations' prefixes
AFFINITY_NODES = 4  # nodes remembered per conversation (as coordinator/affinity.py per prefix)
CONVERSATION_GIB = 0.5  # KV of a ~4k-token conversation of an 8B model (GQA, bf16)


@dataclass
class Outcome:
    request: SimRequest
    first_token_ms: float | None = None
    end_ms: float | None = None
    tokens: int = 0
    cost_nano: float = 0.0  # what the buyer paid (delivered tokens at locked prices)
    nodes: list[str] = field(default_factory=list)
    rejected: str | None = None
    cached_tokens: int = 0  # prompt tokens the first node already held (prefix cache hit)

    @property
    def slo_met(self) -> bool:
        r = self.request
        if self.rejected or self.end_ms is None or self.first_token_ms is None:
            return False
        if r.max_ttft_ms is not None and self.first_token_ms - r.arrival_ms > r.max_ttft_ms:
            return False
        if r.min_tokens_per_s and self.tokens > 1:
            rate = (self.tokens - 1) * 1000.0 / max(self.end_ms - self.first_token_ms, 1e-9)
            return rate >= r.min_tokens_per_s * 0.999
        return True


@dataclass
class _Run:
    req: SimRequest
    outcome: Outcome
    node: int
    start_ms: float
    first_ms: float
    speed: float  # tok/s of this stream
    tokens_before: int  # delivered by earlier nodes (failover)
    streams: int
    hit: int = 0  # prompt tokens served from the node's prefix cache
    end_ms: float = 0.0
    done: bool = False


@dataclass
class SimResult:
    outcomes: list[Outcome]
    dispatch_log: list[str]  # node id per assignment, in order
    sim_ms: float
    dispatches: int
    utilisation: list[float] = field(default_factory=list)  # per node: mean busy streams ÷ max streams

    def metrics(self, overclaimers: set[str] | None = None) -> dict:
        served = [o for o in self.outcomes if o.end_ms is not None]
        tokens = sum(o.request.prompt_tokens + o.tokens for o in served)
        cost = sum(o.cost_nano for o in served)
        lat = np.array([o.end_ms - o.request.arrival_ms for o in served]) if served else np.zeros(1)
        ttft = np.array([o.first_token_ms - o.request.arrival_ms for o in served]) if served else np.zeros(1)
        out = {
            "requests": len(self.outcomes),
            "served": len(served),
            "rejected": sum(o.rejected is not None for o in self.outcomes),
            "cost_per_mtok_usd": cost / max(tokens, 1) / 1e3,  # nano-$/tok → $/Mtok
            "slo_attainment": sum(o.slo_met for o in self.outcomes) / max(len(self.outcomes), 1),
            "p50_latency_ms": float(np.percentile(lat, 50)),
            "p99_latency_ms": float(np.percentile(lat, 99)),
            "p50_ttft_ms": float(np.percentile(ttft, 50)),
            "p99_ttft_ms": float(np.percentile(ttft, 99)),
        }
        if overclaimers is not None:
            out["overclaim_share"] = share(self.dispatch_log, overclaimers)
        return out


def share(log: list[str], nodes: set[str], start: int = 0, stop: int | None = None) -> float:
    part = log[start:stop]
    return sum(n in nodes for n in part) / max(len(part), 1)


class Simulation:
    def __init__(
        self,
        fleet: list[SimNode],
        policy: RoutingPolicy,
        seed: int = 0,
        window_ms: float = 20.0,
        learn: bool = True,
        rtt: RttTable | None = None,
        prefix_cache: bool | int = False,
        affinity: bool = False,
        affinity_ttl_ms: float = 300_000.0,
    ) -> None:
        self.fleet, self.policy, self.window_ms, self.learn = fleet, policy, window_ms, learn
        self.affinity, self.affinity_ttl_ms = affinity, affinity_ttl_ms
        # conversations each node's prefix cache holds: True sizes it by the node's memory
        self.cache_size = [
            0 if prefix_cache is False else
            max(1, int(n.kv_cache_gib * PREFIX_CACHE_SHARE / CONVERSATION_GIB)) if prefix_cache is True
            else int(prefix_cache) for n in fleet]
        self.node_cache: list[OrderedDict[str, int]] = [OrderedDict() for _ in fleet]  # conversation -> tokens
        self.served: dict[str, list[tuple[str, int, float]]] = {}  # conversation -> [(node, prompt tokens, ms)]
        self.busy_area = [0.0] * len(fleet)
        self.busy_since = [0.0] * len(fleet)
        self.rng = np.random.default_rng(seed)
        self.rtt = rtt or default_rtt_table()
        self.est = SpeedEstimator()
        for n in fleet:
            adv_prefill = n.advertised_prefill_tokens_per_s
            overhead = max(0.0, n.advertised_ttft_ms - 640_000.0 / adv_prefill)
            self.est.seed(n.id, MODEL, n.advertised_tokens_per_s, overhead, adv_prefill)
        self.backoff = Backoff(base_s=5.0)
        self.active: list[list[_Run]] = [[] for _ in fleet]
        self.up = [True] * len(fleet)
        self.failures = [0] * len(fleet)
        self.node_rtt = [self.rtt.rtt_ms(n.region, COORDINATOR_REGION) for n in fleet]

    def node_states(self, now: float) -> list[NodeState]:
        """The routing snapshot at `now` (ms), built as the dispatch task should build it."""
        out = []
        blocked = self.backoff.blocked(now / 1000.0)
        for i, n in enumerate(self.fleet):
            ratio = self.est.claim_ratio(n.id, MODEL)
            # The benchmark curve's shape at the measured level (claims × measured/claimed).
            curve = ThroughputCurve(n.advertised_tokens_per_s * ratio, n.curve.slowdown_per_stream, n.curve.max_batch)
            busy = len(self.active[i])
            slots = free_slots(curve, busy, MIN_STREAM_FRACTION)
            full = max(busy + 1, curve.max_streams(MIN_STREAM_FRACTION))
            load_factor = 1.0 / (1.0 + curve.slowdown_per_stream * ((busy + 1 + full) // 2 - 1))
            f = self.est.node_fields(n.id, MODEL)
            tps_b = tuple(t * load_factor for t in f["tokens_per_s_by_bucket"])
            out.append(
                NodeState(
                    id=n.id, model=MODEL, price_in=n.price_in, price_out=n.price_out,
                    tokens_per_s=tps_b[1], region=n.region, free_slots=slots,
                    ttft_ms=f["ttft_ms"], rtt_ms=self.node_rtt[i],
                    reputation=1.0 / (1.0 + 0.25 * self.failures[i]),
                    online=self.up[i] and n.id not in blocked,
                    advertised_tokens_per_s=n.advertised_tokens_per_s, claim_ratio=ratio,
                    load=busy / max(curve.max_streams(MIN_STREAM_FRACTION), 1),
                    tokens_per_s_by_bucket=tps_b, ttft_ms_by_bucket=f["ttft_ms_by_bucket"],
                )
            )
        return out

    def run(self, trace: list[SimRequest]) -> SimResult:
        events: list[tuple[float, int, str, object]] = []
        seq = 0

        def push(t: float, kind: str, obj: object) -> None:
            nonlocal seq
            heapq.heappush(events, (t, seq, kind, obj))
            seq += 1

        outcomes = {r.id: Outcome(r) for r in trace}
        followers = {r.after: r for r in trace if r.after is not None}
        for r in trace:
            if r.after is None:
                push(r.arrival_ms, "arrive", r)

        def ended(rid: str, t: float) -> None:  # the next turn of its conversation, after a think
            nxt = followers.get(rid)
            if nxt is not None:
                nxt = replace(nxt, arrival_ms=t + nxt.think_ms)
                outcomes[nxt.id].request = nxt
                push(nxt.arrival_ms, "arrive", nxt)

        self._ended = ended
        for i, n in enumerate(self.fleet):
            if n.mtbf_s:
                push(self.rng.exponential(n.mtbf_s * 1000.0), "fail", i)
        pending: dict[str, tuple[SimRequest, int]] = {}  # id -> (request, tokens already delivered)
        log: list[str] = []
        tick_at: float | None = None
        dispatches, now, left = 0, 0.0, len(trace)
        by_id = {n.id: i for i, n in enumerate(self.fleet)}

        while events and left > 0:
            now, _, kind, obj = heapq.heappop(events)
            if kind == "arrive":
                pending[obj.id] = (obj, 0)
            elif kind == "done":
                run: _Run = obj
                if run.done:
                    continue
                run.done = True
                self._account(run.node, now)
                self.active[run.node].remove(run)
                self._finish(run, now)
                ended(run.req.id, now)
                left -= 1
            elif kind == "fail":
                i = obj
                self.up[i] = False
                self.failures[i] += 1
                self.backoff.record_failure(self.fleet[i].id, now / 1000.0)
                self._account(i, now)
                self.node_cache[i].clear()
                for run in list(self.active[i]):
                    delivered = self._interrupt(run, now)
                    pending[run.req.id] = (run.req, delivered)
                self.active[i] = []
                push(now + self.fleet[i].downtime_s * 1000.0, "recover", i)
            elif kind == "recover":
                self.up[obj] = True
                push(now + self.rng.exponential(self.fleet[obj].mtbf_s * 1000.0), "fail", obj)
            elif kind == "tick":
                tick_at = None
                dispatches += 1
                left -= self._dispatch(now, pending, outcomes, log, push, by_id)
            if pending and tick_at is None:
                tick_at = now + self.window_ms
                push(tick_at, "tick", None)
        for i in range(len(self.fleet)):
            self._account(i, now)
        util = [self.busy_area[i] / max(now, 1e-9) / max(n.curve.max_streams(MIN_STREAM_FRACTION), 1)
                for i, n in enumerate(self.fleet)]
        return SimResult(list(outcomes.values()), log, now, dispatches, util)

    def _account(self, i: int, now: float) -> None:
        """Integrate node i's busy streams up to `now` (call before its count changes)."""
        self.busy_area[i] += len(self.active[i]) * (now - self.busy_since[i])
        self.busy_since[i] = now

    def _dispatch(self, now, pending, outcomes, log, push, by_id) -> int:
        reqs = []
        for rid, (r, delivered) in pending.items():
            o = outcomes[rid]
            started = o.first_token_ms is not None
            reqs.append(
                PendingRequest(
                    id=rid, model=MODEL, prompt_tokens=r.prompt_tokens + delivered,
                    max_tokens=r.max_tokens - delivered, region=r.region, sort=r.sort,
                    max_price=r.max_price, max_ttft_ms=None if started else r.max_ttft_ms,
                    min_tokens_per_s=r.min_tokens_per_s, waited_ms=now - r.arrival_ms,
                    cached_tokens=self._held(r, now),
                )
            )
        decision = self.policy.route(reqs, self.node_states(now))
        finished = 0
        for rid, reason in decision.rejections.items():
            r, delivered = pending.pop(rid)
            if delivered == 0 and outcomes[rid].first_token_ms is None:
                outcomes[rid].rejected = reason
                finished += 1
            else:  # a continuation nobody can take: the buyer keeps what was delivered
                outcomes[rid].end_ms = now
                finished += 1
            self._ended(rid, now)
        for rid, node_id in decision.assignments.items():
            r, delivered = pending.pop(rid)
            i = by_id[node_id]
            self._start(r, delivered, i, now, outcomes[rid], push)
            log.append(node_id)
        return finished

    def _start(self, r: SimRequest, delivered: int, i: int, now: float, o: Outcome, push) -> None:
        n = self.fleet[i]
        self._account(i, now)
        streams = len(self.active[i]) + 1
        speed = n.curve.per_stream(streams) * self.rng.uniform(0.95, 1.05)
        net = self.rtt.rtt_ms(r.region, n.region)
        hit = 0
        cache = self.node_cache[i]
        if r.conversation is not None and r.conversation in cache:
            hit = min(cache[r.conversation], r.prompt_tokens + delivered)
            cache.move_to_end(r.conversation)
        first = now + net + n.ttft_ms(r.prompt_tokens + delivered - hit)
        remaining = max(r.output_tokens - delivered, 1)
        run = _Run(r, o, i, now, first, speed, delivered, streams, hit)
        if not o.nodes:
            o.cached_tokens = hit
        run.end_ms = first + (remaining - 1) * 1000.0 / speed
        if o.first_token_ms is None:
            o.first_token_ms = first
        o.nodes.append(n.id)
        self.active[i].append(run)
        push(run.end_ms, "done", run)

    def _finish(self, run: _Run, now: float) -> None:
        n, r, o = self.fleet[run.node], run.req, run.outcome
        tokens = r.output_tokens - run.tokens_before
        o.tokens = r.output_tokens
        o.end_ms = now
        o.cost_nano += ((r.prompt_tokens + run.tokens_before) * n.price_in + tokens * n.price_out) / 1e6
        self.backoff.record_success(n.id)
        if r.conversation is not None:
            if self.cache_size[run.node] > 0:  # the node keeps the whole context (prompt + answer), LRU
                cache = self.node_cache[run.node]
                cache[r.conversation] = r.prompt_tokens + r.output_tokens
                cache.move_to_end(r.conversation)
                while len(cache) > self.cache_size[run.node]:
                    cache.popitem(last=False)
            # the router learns what the coordinator can: this node served this prompt (the
            # coordinator's map keeps a few nodes per prefix: earlier turns' nodes hold shorter ones)
            seen = [e for e in self.served.get(r.conversation, ()) if e[0] != n.id]
            self.served[r.conversation] = [(n.id, r.prompt_tokens, now)] + seen[:AFFINITY_NODES - 1]
        if self.learn:
            # Observed as a node reporting its cached tokens would let it be: the TTFT of
            # the part it prefilled (the estimate stays an uncached TTFT per bucket).
            computed = r.prompt_tokens + run.tokens_before - run.hit
            self.est.observe(
                n.id, MODEL, computed, n.ttft_ms(computed),
                tokens, run.end_ms - run.first_ms, run.streams, n.curve.slowdown_per_stream,
            )

    def _held(self, r: SimRequest, now: float) -> tuple[tuple[str, int], ...]:
        """The router's affinity hint for `r` (see the module docstring)."""
        if not self.affinity or r.conversation is None:
            return ()
        return tuple((nid, tokens) for nid, tokens, t in self.served.get(r.conversation, ())
                     if now - t <= self.affinity_ttl_ms)

    def _interrupt(self, run: _Run, now: float) -> int:
        """The node died mid-stream: pay for what it delivered; return tokens delivered so far."""
        n, r, o = self.fleet[run.node], run.req, run.outcome
        run.done = True
        got = 0 if now < run.first_ms else 1 + int((now - run.first_ms) * run.speed / 1000.0)
        got = min(got, r.output_tokens - run.tokens_before - 1)
        o.cost_nano += ((r.prompt_tokens + run.tokens_before) * n.price_in + got * n.price_out) / 1e6
        if got == 0 and run.tokens_before == 0:
            o.first_token_ms = None
        return run.tokens_before + got
