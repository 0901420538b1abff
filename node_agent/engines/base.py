"""The interface every engine (built-in torch, vLLM, OpenAI-compatible upstream) offers."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import AsyncIterator


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep generating past end-of-sequence (benchmarks)


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    # Tokens already delivered by another node (failover): generation continues after them,
    # and they count against max_tokens.
    prefix_ids: list[int] = field(default_factory=list)


@dataclass
class TokenEvent:
    """One generated token. `text` is the new text this token adds (may be empty while a
    multi-byte character is incomplete). The last event of a request has `finish_reason`
    set ("stop" or "length"); a stop sequence's own tokens are not emitted."""

    token_id: int
    logprob: float
    text: str
    finish_reason: str | None = None


class Engine(abc.ABC):
    """An inference engine for one model."""

    model_name: str

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abc.abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @abc.abstractmethod
    def render_chat(self, messages: list[dict]) -> str:
        """The prompt text for a chat request (the model's chat template)."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Stream tokens for one request; many calls may run concurrently (batched)."""

    @abc.abstractmethod
    async def score(self, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
        """Teacher-forced log-probability of each completion token given what precedes it."""

    async def start(self) -> None:  # pragma: no cover - optional hook
        return None

    async def close(self) -> None:  # pragma: no cover - optional hook
        return None
