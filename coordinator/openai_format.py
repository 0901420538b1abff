"""Shapes of OpenAI-compatible responses (chat and legacy completions, whole and chunked)."""

from __future__ import annotations

import json
import time
from typing import Any


def usage(prompt_tokens: int, completion_tokens: int, cost_nano_usd: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "cost_nano_usd": cost_nano_usd,  # what was charged, in integer nano-dollars
    }


def chunk(kind: str, rid: str, model: str, created: int, *, text: str | None = None,
          first: bool = False, finish_reason: str | None = None, logprobs: dict | None = None,
          index: int = 0) -> dict[str, Any]:
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def usage_chunk(kind: str, rid: str, model: str, created: int, u: dict[str, Any]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": u}


def choice(kind: str, text: str, finish_reason: str, logprobs: dict | None = None, index: int = 0) -> dict[str, Any]:
    if kind == "chat":
        return {"index": index, "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason, "logprobs": logprobs}
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def whole(kind: str, rid: str, model: str, created: int, text: str, finish_reason: str,
          u: dict[str, Any], node_id: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return whole_of(kind, rid, model, created, [choice(kind, text, finish_reason, logprobs)], u, node_id)


def whole_of(kind: str, rid: str, model: str, created: int, choices: list[dict[str, Any]], u: dict[str, Any],
             node_id: str | None) -> dict[str, Any]:
    obj = "chat.completion" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            "usage": u, "system_fingerprint": f"agora-node-{node_id[:12]}" if node_id else None}


def sse(data: dict[str, Any] | str) -> bytes:
    body = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {body}\n\n".encode()


def now() -> int:
    return int(time.time())
