"""A pacing wrapper: caps each request's stream at `tokens_per_s`.

For sellers who want to sell a slice of a machine, for simulating slower hardware in the
demo, and for tests (a stream slow enough to interrupt). The benchmark measures the
wrapped engine through the same `generate()`, so a throttled node advertises its real,
throttled speed.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from node_agent.engines.base import Engine, GenerationRequest, TokenEvent


class ThrottledEngine(Engine):
    def __init__(self, inner: Engine, tokens_per_s: float):
        if tokens_per_s <= 0:
            raise ValueError("tokens_per_s must be positive")
        self.inner, self.tokens_per_s = inner, tokens_per_s
        self.model_name = f"{inner.model_name}@{tokens_per_s:g}tps"  # its own benchmark cache entry
        self.device = getattr(inner, "device", "cpu")
        self.dtype = getattr(inner, "dtype", "unknown")
        self.max_seq_len = getattr(inner, "max_seq_len", 2048)

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)

    def render_chat(self, messages: list[dict]) -> str:
        return self.inner.render_chat(messages)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        interval = 1.0 / self.tokens_per_s
        start = time.monotonic()
        n = 0
        async for ev in self.inner.generate(request):
            n += 1
            delay = start + n * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            yield ev

    async def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        return await self.inner.score(prompt_ids, completion_ids)

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name):  # anything else (tokenizer, model, ...) from the wrapped engine
        return getattr(self.inner, name)
