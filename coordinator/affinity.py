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

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

CHUNK_CHARS = 256  # completion prompts: one chain link per this many characters
NODES_PER_PREFIX = 4
MESSAGE_ALLOWANCE = 8  # as ChatCompletionRequest.prompt_bytes counts each message


def _link(prev: bytes, *parts: bytes) -> bytes:
    h = hashlib.blake2b(prev, digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(4, "little"))
        h.update(p)
    return h.digest()


def prefix_chain(model: str, payload: dict[str, Any]) -> list[tuple[bytes, int]]:
    """(chain hash, prefix size) for each prefix of a request's prompt, shortest first.

    Chat: one link per message (role + content); the size counts each message's UTF-8
    bytes + 8. Completion: one link per `CHUNK_CHARS` characters (only whole chunks, and
    the whole prompt last). Seeded by the model: the same text for another model is another
    cache."""
    h = _link(b"agora-prefix", model.encode())
    out: list[tuple[bytes, int]] = []
    messages = payload.get("messages")
    if messages is not None:
        size = MESSAGE_ALLOWANCE
        for m in messages:
            content = m.get("content") or ""
            if not isinstance(content, str):
                content = str(content)
            data = content.encode()
            size += len(data) + MESSAGE_ALLOWANCE
            h = _link(h, str(m.get("role", "")).encode(), data)
            out.append((h, size))
        return out
    prompt = payload.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return out
    size = 0
    for lo in range(0, len(prompt) - CHUNK_CHARS + 1, CHUNK_CHARS):
        data = prompt[lo:lo + CHUNK_CHARS].encode()
        size += len(data)
        h = _link(h, data)
        out.append((h, size))
    if len(prompt) % CHUNK_CHARS:
        out.append((_link(h, b"\x00end", prompt[len(prompt) - len(prompt) % CHUNK_CHARS:].encode()),
                    len(prompt.encode()) + 2))
    return out


class PrefixMap:
    """Chain hash → {node id: (prefix size, time)}, LRU-bounded, entries expire after a TTL."""

    def __init__(self, max_entries: int = 100_000, ttl_s: float = 300.0, clock=time.monotonic) -> None:
        self.max_entries, self.ttl_s, self.clock = max_entries, ttl_s, clock
        self._map: OrderedDict[bytes, dict[str, tuple[int, float]]] = OrderedDict()
        self._lock = threading.Lock()  # routing runs in worker threads, recording on the event loop

    def __len__(self) -> int:
        return len(self._map)

    def record(self, chain: Iterable[tuple[bytes, int]], node_id: str) -> None:
        """`node_id` has just served a prompt with these prefixes: it holds them all."""
        now = self.clock()
        with self._lock:
            for key, size in chain:
                nodes = self._map.get(key)
                if nodes is None:
                    nodes = self._map[key] = {}
                else:
                    self._map.move_to_end(key)
                    nodes.pop(node_id, None)
                nodes[node_id] = (size, now)  # newest last
                while len(nodes) > NODES_PER_PREFIX:
                    nodes.pop(next(iter(nodes)))
            while len(self._map) > self.max_entries:
                self._map.popitem(last=False)

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
