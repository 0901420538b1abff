"""Baseline routing policies, for the benchmark and for operators who want them.

All of them honour the hard filters a buyer states explicitly and any router would check
(model, online, a free slot, `max_price`, a required region) but none models latency:
they show what the latency-aware price-performance policy buys.

- `random`: uniform over eligible nodes with a free slot.
- `round_robin`: rotate over the node list (the cursor lives in the instance).
- `least_loaded`: the node with the lowest load share after this batch's assignments.
- `cheapest_first`: lowest expected cost (prompt × in + max_tokens × out).
- `inverse_square_price`: OpenRouter's default load balancing: random, weighted by
  1 / price² (output price), among eligible nodes.
"""

from __future__ import annotations

import numpy as np

from scheduler.routing import Decision, NodeState, PendingRequest, RoutingPolicy, register_policy


class _Baseline(RoutingPolicy):
    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.cursor = 0

    def pick(self, req: PendingRequest, idx: np.ndarray, nodes: list[NodeState], taken: np.ndarray) -> int:
        raise NotImplementedError

    def route(self, requests: list[PendingRequest], nodes: list[NodeState]) -> Decision:
        decision = Decision()
        online = [n for n in nodes if n.online]
        model = np.array([n.model for n in online], dtype=object)
        price = np.array([n.price_out for n in online], dtype=np.float64)
        region = np.array([n.region for n in online], dtype=object)
        free = np.array([max(n.free_slots, 0) for n in online], dtype=np.int64)
        self._price_in = np.array([n.price_in for n in online], dtype=np.float64)
        self._price_out = price
        self._load = np.array([n.load for n in online], dtype=np.float64)
        self._cap = free / np.maximum(1.0 - np.minimum(self._load, 0.95), 0.05)
        taken = np.zeros(len(online), dtype=np.int64)
        for req in requests:
            ok = model == req.model
            if not ok.any():
                decision.rejections[req.id] = f"no online node serves model {req.model!r}"
                continue
            if req.max_price is not None:
                ok &= price <= req.max_price
                if not ok.any():
                    decision.rejections[req.id] = f"max_price {req.max_price} is below every node's output price"
                    continue
            if req.require_region:
                ok &= region == req.region
                if not ok.any():
                    decision.rejections[req.id] = f"no online node in required region {req.region!r}"
                    continue
            idx = np.flatnonzero(ok & (taken < free))
            if len(idx) == 0:
                decision.deferred.append(req.id)
                continue
            j = self.pick(req, idx, online, taken)
            taken[j] += 1
            decision.assignments[req.id] = online[j].id
        return decision


@register_policy
class RandomPolicy(_Baseline):
    name = "random"

    def pick(self, req, idx, nodes, taken):
        return int(self.rng.choice(idx))


@register_policy
class RoundRobinPolicy(_Baseline):
    name = "round_robin"

    def pick(self, req, idx, nodes, taken):
        n = len(nodes)
        pos = (idx - self.cursor) % n
        j = int(idx[pos.argmin()])
        self.cursor = (j + 1) % n
        return j


@register_policy
class LeastLoadedPolicy(_Baseline):
    name = "least_loaded"

    def pick(self, req, idx, nodes, taken):
        load = self._load[idx] + taken[idx] / np.maximum(self._cap[idx], 1.0)
        return int(idx[load.argmin()])


@register_policy
class CheapestFirstPolicy(_Baseline):
    name = "cheapest_first"

    def pick(self, req, idx, nodes, taken):
        cost = req.prompt_tokens * self._price_in[idx] + req.max_tokens * self._price_out[idx]
        return int(idx[cost.argmin()])


@register_policy
class InverseSquarePricePolicy(_Baseline):
    name = "inverse_square_price"

    def pick(self, req, idx, nodes, taken):
        w = 1.0 / np.maximum(self._price_out[idx], 1.0) ** 2
        return int(self.rng.choice(idx, p=w / w.sum()))
