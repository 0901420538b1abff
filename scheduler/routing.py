"""Routing: the data a policy sees, the decision it returns, and the policy registry.

Pure code: plain data in, a `Decision` out, no I/O. The Celery dispatch task loads the
snapshot, calls `get_policy(name).route(...)`, and stores the result.

Built-in policies live in `scheduler.policies` (the default, vectorised price-performance
policy) and `scheduler.baselines` (random, round-robin, least-loaded, cheapest-first,
inverse-square-price); both register themselves here when first asked for.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Literal

Sort = Literal["price", "throughput", "latency"]


@dataclass(frozen=True)
class PendingRequest:
    id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    region: str | None = None
    sort: Sort | None = None  # None: balanced price-performance
    max_price: int | None = None  # nano-dollars per million output tokens
    max_ttft_ms: float | None = None
    min_tokens_per_s: float | None = None
    waited_ms: float = 0.0  # time already spent queued; counts against max_ttft_ms
    require_region: bool = False  # True: only nodes in `region` (data residency)
    # Set by admission: the escrow hold covers input prices up to this (nano-USD per Mtok)
    max_price_in: int | None = None
    allow_unverified: bool = False  # the buyer accepts nodes whose work cannot be audited
    quantization: tuple[str, ...] | None = None  # weight precisions accepted ("none": full); None: any
    # Cache affinity: (node id, prompt units that node probably still holds as a prefix KV
    # cache, in the units of `prompt_tokens`), from the coordinator's prefix map
    # (coordinator/affinity.py) or the simulator. Lowers only the expected TTFT on that node.
    cached_tokens: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class NodeState:
    id: str
    model: str
    price_in: int  # nano-dollars per million tokens
    price_out: int
    tokens_per_s: float  # measured (seeded by the advertised figure)
    region: str
    free_slots: int
    ttft_ms: float = 0.0
    rtt_ms: float = 0.0  # network RTT to the coordinator
    reputation: float = 1.0  # 0..1
    online: bool = True
    verifiable: bool = True  # its engine gives token ids and log-probs (its jobs can be audited)
    quantization: str = "none"  # its declared weight precision ("none": full-precision weights)
    # Advertised figures (seeds of the estimate); the gap to the measured ones costs weight.
    advertised_tokens_per_s: float | None = None
    claim_ratio: float | None = None  # measured ÷ advertised single-stream tok/s (estimator)
    load: float = 0.0  # share of the node's slots busy now, 0..1
    # Per prompt-length bucket (see scheduler.estimates.PROMPT_BUCKET_EDGES); None: use scalars.
    tokens_per_s_by_bucket: tuple[float, ...] | None = None
    ttft_ms_by_bucket: tuple[float, ...] | None = None
    # Prompt tokens per second of prefill (the benchmark's); None: the slope of the TTFT buckets.
    prefill_tokens_per_s: float | None = None


def prefill_ms_per_token(node: NodeState) -> float:
    """Milliseconds of the node's TTFT per prompt token: from its prefill rate when known,
    else the slope of its per-bucket TTFT (first to last bucket), never negative."""
    if node.prefill_tokens_per_s:
        return 1000.0 / max(node.prefill_tokens_per_s, 1e-6)
    from scheduler.estimates import BUCKET_MIDPOINTS, N_BUCKETS

    t = node.ttft_ms_by_bucket
    if t is None or len(t) != N_BUCKETS:
        return 0.0
    return max(0.0, (t[-1] - t[0]) / (BUCKET_MIDPOINTS[-1] - BUCKET_MIDPOINTS[0]))


AFFINITY_CAP = 0.9  # a cache hit saves at most this share of the node's expected TTFT


def affinity_saving_ms(req: PendingRequest, node: NodeState, ttft_ms: float | None = None) -> float:
    """Expected prefill time `node` saves on `req` because it holds part of its prompt."""
    if not req.cached_tokens:
        return 0.0
    held = max((t for nid, t in req.cached_tokens if nid == node.id), default=0)
    if held <= 0:
        return 0.0
    ttft = node.ttft_ms if ttft_ms is None else ttft_ms
    return min(min(held, req.prompt_tokens) * prefill_ms_per_token(node), AFFINITY_CAP * max(ttft, 0.0))


def eligible(req: PendingRequest, node: NodeState) -> bool:
    """Per-request limits the policy does not score: the input-price cap the escrow hold
    covers, unverifiable nodes only for buyers who accept them, and the weight precisions
    the buyer accepts."""
    return ((node.verifiable or req.allow_unverified) and (req.max_price_in is None or node.price_in <= req.max_price_in)
            and (req.quantization is None or node.quantization in req.quantization))


@dataclass
class Decision:
    assignments: dict[str, str] = field(default_factory=dict)  # request id -> node id
    rejections: dict[str, str] = field(default_factory=dict)  # request id -> reason
    deferred: list[str] = field(default_factory=list)  # feasible, but no free slot now


class RoutingPolicy(abc.ABC):
    name: str

    @abc.abstractmethod
    def route(self, requests: list[PendingRequest], nodes: list[NodeState]) -> Decision: ...


_REGISTRY: dict[str, type[RoutingPolicy]] = {}
DEFAULT_POLICY = "price_performance"
_BUILTIN_MODULES = ("scheduler.policies", "scheduler.baselines")


def register_policy(cls: type[RoutingPolicy]) -> type[RoutingPolicy]:
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    import importlib

    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def get_policy(name: str | None = None) -> RoutingPolicy:
    _load_builtins()
    key = name or DEFAULT_POLICY
    try:
        return _REGISTRY[key]()
    except KeyError:
        raise ValueError(f"unknown routing policy {key!r}; known: {sorted(_REGISTRY)}") from None


def available_policies() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


@register_policy
class GreedyPolicy(RoutingPolicy):
    """Simple and correct: each request, in arrival order, goes to the eligible node with a
    free slot that its preference ranks first (default: cost per token ÷ measured speed)."""

    name = "greedy"

    def route(self, requests: list[PendingRequest], nodes: list[NodeState]) -> Decision:
        decision = Decision()
        free = {n.id: n.free_slots for n in nodes}
        for req in requests:
            candidates = [n for n in nodes if n.online and n.model == req.model]
            if not candidates:
                decision.rejections[req.id] = f"no online node serves model {req.model!r}"
                continue
            if req.max_price is not None:
                candidates = [n for n in candidates if n.price_out <= req.max_price]
                if not candidates:
                    decision.rejections[req.id] = (
                        f"no node serves {req.model!r} at or below max_price {req.max_price}"
                    )
                    continue
            if req.min_tokens_per_s is not None:
                candidates = [n for n in candidates if n.tokens_per_s >= req.min_tokens_per_s]
                if not candidates:
                    decision.rejections[req.id] = (
                        f"no node reaches min_tokens_per_s {req.min_tokens_per_s}"
                    )
                    continue
            ranked = sorted(candidates, key=lambda n: _rank_key(req, n))
            chosen = next((n for n in ranked if free[n.id] > 0), None)
            if chosen is None:
                decision.deferred.append(req.id)
                continue
            free[chosen.id] -= 1
            decision.assignments[req.id] = chosen.id
        return decision


def _rank_key(req: PendingRequest, node: NodeState) -> tuple:
    cost = req.prompt_tokens * node.price_in + req.max_tokens * node.price_out
    same_region = 0 if (req.region is None or req.region == node.region) else 1
    if req.sort == "price":
        return (cost, -node.tokens_per_s)
    if req.sort == "throughput":
        return (-node.tokens_per_s, cost)
    if req.sort == "latency":
        return (same_region, node.ttft_ms + node.rtt_ms - affinity_saving_ms(req, node), -node.tokens_per_s)
    return (same_region, cost / max(node.tokens_per_s, 1e-9) / max(node.reputation, 1e-3))
