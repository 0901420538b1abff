"""The interface every engine (built-in torch, vLLM, OpenAI-compatible upstream) offers."""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator

from node_agent.errors import EngineError

if TYPE_CHECKING:  # numpy/torch stay unimported until an engine rescores
    from node_agent.rescoring import Rescore


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep generating past end-of-sequence (benchmarks)
    top_logprobs: int = 0  # alternatives per token to report (TokenEvent.top), where the engine can


@dataclass
class GenerationRequest:
    """One request to an engine.

    `prefix_ids`: tokens already delivered by another node (failover); generation continues
    after them. Engines spend `max_new_tokens` = max_tokens - len(prefix_ids). When the
    delivered part is known only as text (re-tokenised here, so its length need not be the
    number of tokens delivered), build the request with `continuing`, which keeps that
    rule true for every engine."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    prefix_ids: list[int] = field(default_factory=list)

    @property
    def max_new_tokens(self) -> int:
        return max(self.sampling.max_tokens - len(self.prefix_ids), 0)

    @classmethod
    def continuing(cls, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                   prefix_ids: list[int], delivered: int) -> GenerationRequest:
        """After `delivered` tokens (which count against `sampling.max_tokens`) whose text
        this engine tokenised as `prefix_ids`: max_tokens is shifted by the difference so
        the budget left is max_tokens - delivered whatever len(prefix_ids) is."""
        shifted = dataclasses.replace(sampling, max_tokens=sampling.max_tokens - delivered + len(prefix_ids))
        return cls(request_id, list(prompt_ids), shifted, list(prefix_ids))


@dataclass
class TokenEvent:
    """One generated token (or, from an engine that cannot name its tokens, `count` of them).

    `text` is the new text the token adds (may be empty while a multi-byte character is
    incomplete). `token_id` is None when the engine cannot name the token (an
    OpenAI-compatible server without ids); `logprob` is None when the engine reports none.
    The last event of a request has `finish_reason` set ("stop" or "length"); a stop
    sequence's own tokens are not emitted."""

    token_id: int | None
    logprob: float | None
    text: str
    finish_reason: str | None = None
    count: int = 1  # tokens this event stands for (more than 1 only without token ids)
    top: list[tuple[int | None, str, float]] | None = None  # (id, text, log-prob) of the likeliest, best first


class Engine(abc.ABC):
    """An inference engine for one model.

    What an engine can do goes into its market offer: engines that cannot name their
    tokens or report log-probs set `token_ids` / `logprobs` False (their work cannot be
    audited); an engine that can verify others' jobs implements `rescore`."""

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

    async def rescore(self, prompt_ids: list[int], claimed_ids: list[int], sampling) -> Rescore:
        """A verifier's statistics (`node_agent.rescoring.Rescore`) for another node's claimed
        tokens after `prompt_ids` under `sampling`; engines that can score override it."""
        raise EngineError(f"{type(self).__name__} cannot verify")

    async def start(self) -> None:  # pragma: no cover - optional hook
        return None

    async def close(self) -> None:  # pragma: no cover - optional hook
        return None

    def take_usage(self, request_id: str) -> dict | None:
        """The engine's own token counts for a finished request (an upstream server's
        `usage`), once; None when the engine counts by token ids (the agent counts those)."""
        return None
