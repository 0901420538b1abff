"""Prompt prefixes named without a tokenizer: the chain hashes cache-aware routing uses.

The coordinator (`coordinator/affinity.py`) hashes each request's prompt prefixes to find
nodes that probably still hold them in their KV cache; a node agent hashes the prompts it
served the same way and reports which of them its engine's prefix cache still holds
(`node_agent/prefix_report.py`). Both sides must compute the same hashes, so they live here.
"""

from __future__ import annotations

import hashlib
from typing import Any

CHUNK_CHARS = 256  # completion prompts: one chain link per this many characters
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
