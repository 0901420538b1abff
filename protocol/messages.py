"""The messages between node agents and the coordinator: registration and heartbeats
(signed HTTP), the work channel's frames (WebSocket), receipts and verification jobs.
Money on the wire is integers: prices are nano-dollars per million tokens."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from protocol.signing import Signed

PROTOCOL_VERSION = 1
INT64_MAX = 2**63 - 1  # integers on the wire fit a database BIGINT


# ---------------------------------------------------------------- registration
class ModelOffer(BaseModel):
    model: str = Field(min_length=1, max_length=200)
    price_in: int = Field(ge=0, le=INT64_MAX, description="nano-dollars per million prompt tokens")
    price_out: int = Field(ge=0, le=INT64_MAX, description="nano-dollars per million completion tokens")
    tokens_per_s: float = Field(gt=0, description="benchmarked decode tok/s at full batch")
    tokens_per_s_b1: float | None = Field(default=None, gt=0, description="decode tok/s at batch 1")
    ttft_ms: float | None = Field(default=None, ge=0)
    max_context: int = Field(default=2048, gt=0)
    dtype: str = Field(default="float32", max_length=16, description="weights/compute dtype (audit tolerance)")
    quantization: str | None = Field(default=None, max_length=16,
                                     description="weight quantisation (int8, int4, fp8, awq, gptq...); None: none")
    token_ids: bool = Field(default=True, description="the engine names its tokens (ids in chunks)")
    logprobs: bool = Field(default=True, description="the engine reports per-token log-probs")
    can_verify: bool = Field(default=True, description="the engine can rescore others' jobs (verifier)")


class Registration(Signed):
    models: list[ModelOffer] = Field(min_length=1)
    region: str = Field(min_length=1, max_length=64)
    max_concurrency: int = Field(ge=1, le=4096)
    engine: str = "builtin"
    benchmark: dict[str, Any] = Field(default_factory=dict)
    name: str | None = Field(default=None, max_length=100)
    operator: str | None = Field(default=None, max_length=64,
                                 description="who runs the node; a node never verifies its own operator's work")
    verify_only: bool = Field(default=False, description="an operator-run verifier: it is never sold work")


class Heartbeat(Signed):
    """Liveness only: the coordinator counts a node's load from its own assignments
    (measured, not claimed)."""


class ChannelHello(Signed):
    """First frame on the work channel: proves the connecting agent holds the key."""

    protocol: int = PROTOCOL_VERSION


class AccountQuery(Signed):
    """A node asks for its own earnings, stake and statement."""

    limit: int = Field(default=50, ge=1, le=500)
    before: int | None = Field(default=None, ge=1, le=INT64_MAX)


class PayoutRequest(Signed):
    """Move `amount` of the node's earnings out of the market (to its operator)."""

    amount: int = Field(gt=0, le=INT64_MAX)
    idempotency_key: str = Field(min_length=1, max_length=120)
    destination: str | None = Field(default=None, max_length=64)


class UnbondRequest(Signed):
    """Start withdrawing `amount` of stake; it is paid after the unbonding delay."""

    amount: int = Field(gt=0, le=INT64_MAX)
    idempotency_key: str = Field(min_length=1, max_length=120)


class ReverifyRequest(Signed):
    """A seller appeals one of its failed audits: another verifier judges the job again."""

    audit_id: int = Field(ge=1, le=INT64_MAX)


# ---------------------------------------------------------------- work channel frames
class Sampling(BaseModel):
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    top_logprobs: int = Field(default=0, ge=0, le=20, description="alternatives per token the buyer asked for "
                              "(chunks' `top_logprobs`); nodes that predate it ignore it")


class Assignment(BaseModel):
    type: Literal["assign"] = "assign"
    request_id: str
    model: str
    kind: Literal["chat", "completion"]
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    sampling: Sampling
    price_in: int
    price_out: int
    # On failover the new node continues after what was already delivered: these token ids
    # when every earlier node could name its tokens (exact), else after `prefix_text`.
    prefix_token_ids: list[int] = Field(default_factory=list)
    prefix_text: str = ""
    prefix_tokens: int = Field(default=0, ge=0, description="tokens delivered before (count against max_tokens)")


class TopLogprob(BaseModel):
    """One of the most likely tokens at a position: its id, text and quantised log-prob."""

    token_id: int | None = Field(default=None, ge=0, lt=2**32)
    text: str = Field(max_length=256)
    logprob: int = Field(ge=-(2**31), lt=2**31, description="round(logprob * LOGPROB_SCALE)")


class TokenChunk(BaseModel):
    """One or more consecutive generated tokens of one request.

    `token_ids` is None when the engine cannot name its tokens (an OpenAI-compatible
    server without a local tokenizer): `count` then says how many tokens the chunk holds
    (from the server's own count) and the commitment covers the text. `logprobs` is None
    when the engine reports none (such a node cannot be verified)."""

    type: Literal["tokens"] = "tokens"
    request_id: str
    start: int = Field(ge=0, le=INT64_MAX, description="index of the first token in this chunk")
    token_ids: list[Annotated[int, Field(ge=0, lt=2**32)]] | None = None
    logprobs: list[Annotated[int, Field(ge=-(2**31), lt=2**31)]] | None = Field(
        default=None, description="round(logprob * LOGPROB_SCALE) per token")
    count: int | None = Field(default=None, ge=0, description="tokens in this chunk (default: len(token_ids))")
    text: str
    top_logprobs: list[Annotated[list[TopLogprob], Field(max_length=20)]] | None = Field(
        default=None, description="per token, the most likely alternatives, best first (only when the "
        "assignment asked for them and the engine can tell; not part of the commitment)")

    @model_validator(mode="after")
    def _consistent(self) -> "TokenChunk":
        if self.token_ids is None and self.count is None:
            raise ValueError("a chunk without token ids must say its token count")
        if self.token_ids is not None and self.count is not None and self.count != len(self.token_ids):
            raise ValueError("count disagrees with token_ids")
        if self.logprobs is not None and len(self.logprobs) != self.n:
            raise ValueError("one log-prob per token")
        if self.top_logprobs is not None and len(self.top_logprobs) != self.n:
            raise ValueError("one list of top log-probs per token")
        return self

    @property
    def n(self) -> int:
        return len(self.token_ids) if self.token_ids is not None else int(self.count or 0)


class Receipt(Signed):
    request_id: str
    model: str
    prompt_tokens: int = Field(ge=0, le=INT64_MAX)
    completion_tokens: int = Field(ge=0, le=INT64_MAX)
    commitment: str = Field(description="hex hash chain over (token id, log-prob) pairs")
    finish_reason: str


class Done(BaseModel):
    type: Literal["done"] = "done"
    request_id: str
    receipt: Receipt


class VerifyJob(BaseModel):
    """Coordinator -> verifier: rescore another node's claimed output (one prefill)."""

    type: Literal["verify"] = "verify"
    audit_id: int
    model: str
    kind: Literal["chat", "completion"]
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    claimed_ids: list[int]
    sampling: Sampling


class VerifyResult(BaseModel):
    """Verifier -> coordinator: `node_agent.rescoring.Rescore.to_dict()` for the job."""

    type: Literal["verify_result"] = "verify_result"
    audit_id: int
    rescore: dict[str, Any] | None = None
    error: str | None = None


class WorkError(BaseModel):
    type: Literal["error"] = "error"
    request_id: str
    code: str
    message: str


