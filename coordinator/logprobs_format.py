"""Per-token log-probs in OpenAI's shapes, from the `tokens` messages nodes relay.

Nodes send log-probs quantised (`round(lp * LOGPROB_SCALE)`, protocol/commitment.py) and,
when the assignment asked for alternatives, `top_logprobs` per token ({token_id, text,
logprob} quantised the same way, best first). A token's text is the text its chunk
added: engines that name their tokens send one chunk per token, so each token gets its own
piece; a token that completes a multi-byte character carries the whole character (its
predecessor's piece is empty), so `bytes` are the UTF-8 bytes of the piece, not the raw
bytes of the token.

Chat: `choices[].logprobs = {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}`.
Completions: `choices[].logprobs = {tokens, token_logprobs, top_logprobs, text_offset}`.
Streaming sends each chunk's own part of the same object.
"""

from __future__ import annotations

import logging
from typing import Any

from protocol import LOGPROB_SCALE
from protocol.commitment import NO_LOGPROB

log = logging.getLogger(__name__)
UNKNOWN = -9999.0  # OpenAI's value for a log-prob too small to report; used where a node sent none


def value(q: int | None) -> float:
    """A quantised log-prob as the buyer sees it (never above 0: rounding cannot make it so)."""
    if q is None or q == NO_LOGPROB:
        return UNKNOWN
    return min(q / LOGPROB_SCALE, 0.0)


def tokens_of(msg: dict) -> list[tuple[str, float, list[tuple[str, float]]]]:
    """(text, log-prob, [(alternative text, log-prob)...]) per token of one `tokens` message."""
    n = int(msg.get("count") or 0)
    if n <= 0:
        return []
    lps = msg.get("logprobs") or [None] * n
    tops = msg.get("top_logprobs") or [[] for _ in range(n)]
    text = msg.get("text", "")
    out = []
    for k in range(n):  # one token per chunk from id-naming engines; else the text goes with the last
        alts = [(a["text"], value(a["logprob"])) for a in (tops[k] if k < len(tops) else [])]
        out.append((text if k == n - 1 else "", value(lps[k] if k < len(lps) else None), alts))
    return out


class LogprobsBuilder:
    """Builds the `logprobs` object of one choice, chunk by chunk (`part`) and whole (`whole`)."""

    def __init__(self, kind: str, top_k: int, text_offset: int = 0):
        self.kind, self.top_k = kind, top_k
        self.offset = text_offset  # completions: characters before the next token (the prompt's first)
        self.content: list[dict[str, Any]] = []
        self.tokens: list[str] = []
        self.token_logprobs: list[float] = []
        self.top: list[dict[str, float]] = []
        self.offsets: list[int] = []

    def part(self, msg: dict) -> dict[str, Any]:
        """The logprobs object of the tokens in `msg` alone (a streamed chunk's), recorded for `whole`."""
        start_content, start_tokens = len(self.content), len(self.tokens)
        for text, lp, alts in tokens_of(msg):
            alts = sorted(alts, key=lambda a: -a[1])[:self.top_k]
            if self.kind == "chat":
                self.content.append({"token": text, "logprob": lp, "bytes": list(text.encode("utf-8")),
                                     "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                                                      for t, v in alts]})
            else:
                self.tokens.append(text)
                self.token_logprobs.append(lp)
                top: dict[str, float] = {}
                for t, v in alts:  # alternatives whose texts coincide: the likelier one
                    top.setdefault(t, v)
                self.top.append(top)
                self.offsets.append(self.offset)
                self.offset += len(text)
        if self.kind == "chat":
            return {"content": self.content[start_content:], "refusal": None}
        return self._completion(start_tokens)

    def _completion(self, start: int) -> dict[str, Any]:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top[start:] if self.top_k else None, "text_offset": self.offsets[start:]}

    def whole(self) -> dict[str, Any]:
        if self.kind == "chat":
            return {"content": list(self.content), "refusal": None}
        return self._completion(0)


def builder_for(body, kind: str) -> LogprobsBuilder | None:
    """A builder when the request asked for log-probs, else None (the answer says `logprobs: null`)."""
    if not body.wants_logprobs():
        return None
    offset = len(body.prompt) if kind == "completion" else 0
    return LogprobsBuilder(kind, body.top_logprobs_k(), offset)
