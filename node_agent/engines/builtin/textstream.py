"""Turning generated token ids into streamed text: incremental detokenization and stop strings."""

from __future__ import annotations

import dataclasses
from typing import Callable

from node_agent.engines.base import TokenEvent


class Detokenizer:
    """Text deltas for a growing id list, safe for multi-byte characters split across tokens.

    Decodes a short window of ids (from the last clean boundary) and holds back output while
    it ends in an incomplete character (U+FFFD).

    `delivered_ids` are tokens already streamed by someone else (a failover continuation):
    they are replayed silently, so the state is exactly that of the node that streamed them,
    including any bytes of an incomplete character it held back at its last token. Those
    bytes come out with the first new token, and the concatenated text equals one run."""

    def __init__(self, decode: Callable[[list[int]], str], context_ids: list[int],
                 delivered_ids: list[int] = ()):
        self.decode = decode
        self.ids = list(context_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(0, self.read_offset - 6)
        for t in delivered_ids:
            self.add(t)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete character decodes as U+FFFD)."""
        prefix_text = self.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.decode(self.ids[self.prefix_offset :])
        self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopStream:
    """Holds events back while their text could be the start of a stop string.

    `push` returns the events that are safe to send; when a stop string appears, the events
    that make it up are dropped, text before it is kept, and the last kept event carries
    finish_reason="stop". With stop strings, the newest event is always held so that it can
    become the final one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held: list[TokenEvent] = []
        self.stopped = False

    def push(self, ev: TokenEvent) -> list[TokenEvent]:
        if not self.stops:
            return [ev]
        self.held.append(ev)
        text = "".join(e.text for e in self.held)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            return self._cut(min(hits))
        safe = len(text)
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        out, end = [], 0
        while len(self.held) > 1 and end + len(self.held[0].text) <= safe:
            end += len(self.held[0].text)
            out.append(self.held.pop(0))
        return out

    def _cut(self, index: int) -> list[TokenEvent]:
        kept, end = [], 0
        for e in self.held:
            if end >= index and kept:
                break
            if end + len(e.text) > index:
                e = dataclasses.replace(e, text=e.text[: max(0, index - end)])
            kept.append(e)
            end += len(e.text)
            if end >= index:
                break
        kept[-1].finish_reason = "stop"
        self.held = []
        self.stopped = True
        return kept

    def finish(self, ev: TokenEvent, reason: str) -> list[TokenEvent]:
        """The request ends with `ev` (length limit or EOS): flush everything held."""
        out = self.held + [ev] if self.stops else [ev]
        self.held = []
        out[-1].finish_reason = reason
        return out
