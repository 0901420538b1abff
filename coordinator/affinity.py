"""Cache affinity: which node probably still holds a request's prompt prefix in its KV cache.

The coordinator has no tokenizer for most models, so it cannot name a node's cached token
blocks. Like llm-d's approximate prefix scorer, it remembers instead what it routed: when a
request completes on a node, every prefix of its prompt — a chain hash over the chat
messages (each message's role and content), or over fixed-size character chunks of a
completion prompt — is recorded with that node, the prefix's size in the units routing
counts prompts in (`admission`'s UTF-8 bytes + 8 per message: `PendingRequest.prompt_tokens`)
and the time. A new request hashes its own prefixes and looks up, per node, the longest one
that node served recently; the scheduler turns that into saved prefill time
(`PendingRequest.cached_tokens`, `scheduler.scoring`), weighed against price, load and
latency targets and never against capacity.

Per API process, in memory: an LRU bounded in entries (`routing_affinity_entries`), entries
forgotten after `routing_affinity_ttl_s` (about how long a node's cache keeps an idle
conversation). A few nodes per prefix (a shared system prompt is held by many). Hashing a
request's messages is the only per-request work; nothing is written to the database.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from protocol.prefix import CHUNK_CHARS, MESSAGE_ALLOWANCE, prefix_chain  # noqa: F401  (re-exported)

NODES_PER_PREFIX = 4


class PrefixMap:
    """Chain hash → {node id: (prefix size, time)}, LRU-bounded, entries expire after a TTL.

    Filled two ways: `record` (a request completed on a node: it holds every prefix of that
    prompt) and `report` (the node itself said which served prefixes its engine's cache still
    holds, `node_agent/prefix_report.py`): a reported drop forgets the pair at once, where a
    guess from routing alone would keep sending conversations to a node that evicted them.
    """

    def __init__(self, max_entries: int = 100_000, ttl_s: float = 300.0, clock=time.monotonic) -> None:
        self.max_entries, self.ttl_s, self.clock = max_entries, ttl_s, clock
        self._map: OrderedDict[bytes, dict[str, tuple[int, float]]] = OrderedDict()
        self._by_node: dict[str, set[bytes]] = {}  # node id -> its keys (for full reports)
        self._lock = threading.Lock()  # routing runs in worker threads, recording on the event loop

    def __len__(self) -> int:
        return len(self._map)

    def _put(self, key: bytes, node_id: str, size: int, now: float) -> None:
        nodes = self._map.get(key)
        if nodes is None:
            nodes = self._map[key] = {}
        else:
            self._map.move_to_end(key)
            nodes.pop(node_id, None)
        nodes[node_id] = (size, now)  # newest last
        self._by_node.setdefault(node_id, set()).add(key)
        while len(nodes) > NODES_PER_PREFIX:
            self._unindex(next(iter(nodes)), key)
            nodes.pop(next(iter(nodes)))

    def _unindex(self, node_id: str, key: bytes) -> None:
        keys = self._by_node.get(node_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_node[node_id]

    def _drop(self, key: bytes, node_id: str) -> None:
        nodes = self._map.get(key)
        if nodes is not None and nodes.pop(node_id, None) is not None and not nodes:
            del self._map[key]
        self._unindex(node_id, key)

    def _trim(self) -> None:
        while len(self._map) > self.max_entries:
            key, nodes = self._map.popitem(last=False)
            for nid in nodes:
                self._unindex(nid, key)

    def record(self, chain: Iterable[tuple[bytes, int]], node_id: str) -> None:
        """`node_id` has just served a prompt with these prefixes: it holds them all."""
        now = self.clock()
        with self._lock:
            for key, size in chain:
                self._put(key, node_id, size, now)
            self._trim()

    def report(self, node_id: str, held: Iterable[bytes], drop: Iterable[bytes] = (), full: bool = False) -> None:
        """What `node_id` says its cache holds: `held` keys are still cached (their pairs'
        time is renewed: they outlive the TTL while the node keeps them), `drop` ones are not;
        `full` means `held` is everything (its other pairs go). A node can only confirm or
        withdraw pairs it was seen serving here: a key it was never routed is ignored, so a
        seller cannot attract a conversation by claiming a prefix it does not hold."""
        now = self.clock()
        held = set(held)
        with self._lock:
            mine = self._by_node.get(node_id, set())
            if full:
                for key in [k for k in mine if k not in held]:
                    self._drop(key, node_id)
            for key in drop:
                self._drop(key, node_id)
            for key in held & self._by_node.get(node_id, set()):
                nodes = self._map.get(key)
                if nodes is not None and node_id in nodes:
                    nodes[node_id] = (nodes[node_id][0], now)

    def forget_node(self, node_id: str) -> None:
        with self._lock:
            for key in list(self._by_node.get(node_id, ())):
                self._drop(key, node_id)

    def lookup(self, chain: list[tuple[bytes, int]]) -> tuple[tuple[str, int], ...]:
        """((node id, size of the longest prefix it served within the TTL), ...), largest first."""
        if not chain or not self._map:
            return ()
        now = self.clock()
        best: dict[str, int] = {}
        with self._lock:
            for key, _ in reversed(chain):
                nodes = self._map.get(key)
                if nodes is None:
                    continue
                for nid, (size, t) in nodes.items():
                    if now - t <= self.ttl_s and nid not in best:
                        best[nid] = size
        return tuple(sorted(best.items(), key=lambda kv: -kv[1]))
