"""The wire protocol between node agents and the coordinator.

Shared by both sides (the coordinator imports this module; it imports nothing of the
coordinator). Money on the wire is integers: prices are nano-dollars per million tokens.

Signed messages carry `node_id` (the Ed25519 public key, hex), a unix `timestamp`, a
random `nonce` and a `signature` over every other field (see `identity.canonical_bytes`).
The coordinator refuses a bad signature, a timestamp outside its window and a nonce it
has seen before.
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from node_agent.identity import Identity, verify_signature

PROTOCOL_VERSION = 1
LOGPROB_SCALE = 10_000  # log-probs travel and are committed to as round(lp * 1e4)


# ---------------------------------------------------------------- signing helpers
class Signed(BaseModel):
    node_id: str
    timestamp: float
    nonce: str
    signature: str = ""

    def signed_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"signature"})

    def sign(self, identity: Identity) -> "Signed":
        self.signature = identity.sign(self.signed_payload())
        return self

    def signature_valid(self) -> bool:
        return verify_signature(self.node_id, self.signed_payload(), self.signature)


def fresh_stamp() -> dict[str, Any]:
    return {"timestamp": time.time(), "nonce": os.urandom(16).hex()}


# ---------------------------------------------------------------- registration
class ModelOffer(BaseModel):
    model: str = Field(min_length=1, max_length=200)
    price_in: int = Field(ge=0, description="nano-dollars per million prompt tokens")
    price_out: int = Field(ge=0, description="nano-dollars per million completion tokens")
    tokens_per_s: float = Field(gt=0, description="benchmarked decode tok/s at full batch")
    tokens_per_s_b1: float | None = Field(default=None, gt=0, description="decode tok/s at batch 1")
    ttft_ms: float | None = Field(default=None, ge=0)
    max_context: int = Field(default=2048, gt=0)
    dtype: str = Field(default="float32", max_length=16, description="weights/compute dtype (audit tolerance)")


class Registration(Signed):
    models: list[ModelOffer] = Field(min_length=1)
    region: str = Field(min_length=1, max_length=64)
    max_concurrency: int = Field(ge=1, le=4096)
    engine: str = "builtin"
    benchmark: dict[str, Any] = Field(default_factory=dict)
    name: str | None = Field(default=None, max_length=100)
    operator: str | None = Field(default=None, max_length=64,
                                 description="who runs the node; a node never verifies its own operator's work")


class Heartbeat(Signed):
    active: int = Field(default=0, ge=0)
    free_slots: int = Field(default=0, ge=0)


class ChannelHello(Signed):
    """First frame on the work channel: proves the connecting agent holds the key."""

    protocol: int = PROTOCOL_VERSION


class AccountQuery(Signed):
    """A node asks for its own earnings, stake and statement."""

    limit: int = Field(default=50, ge=1, le=500)
    before: int | None = None


class PayoutRequest(Signed):
    """Move `amount` of the node's earnings out of the market (to its operator)."""

    amount: int = Field(gt=0)
    idempotency_key: str = Field(min_length=1, max_length=120)
    destination: str | None = Field(default=None, max_length=64)


class UnbondRequest(Signed):
    """Start withdrawing `amount` of stake; it is paid after the unbonding delay."""

    amount: int = Field(gt=0)
    idempotency_key: str = Field(min_length=1, max_length=120)


# ---------------------------------------------------------------- work channel frames
class Sampling(BaseModel):
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)


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
    # On failover the new node continues after tokens already delivered.
    prefix_token_ids: list[int] = Field(default_factory=list)


class Cancel(BaseModel):
    type: Literal["cancel"] = "cancel"
    request_id: str


class TokenChunk(BaseModel):
    """One or more consecutive generated tokens of one request."""

    type: Literal["tokens"] = "tokens"
    request_id: str
    start: int = Field(ge=0, description="index of the first token in this chunk")
    token_ids: list[int]
    logprobs: list[int] = Field(description="round(logprob * LOGPROB_SCALE) per token")
    text: str


class Receipt(Signed):
    request_id: str
    model: str
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
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


# ---------------------------------------------------------------- commitments
class TokenCommitment:
    """Running hash chain h_i = sha256(h_{i-1} || id:u32 || logprob:i32)[:16].

    16 bytes of state; the final value goes in the signed receipt so a node cannot
    change the tokens or their log-probs after the fact.
    """

    def __init__(self, request_id: str):
        self.state = hashlib.sha256(request_id.encode()).digest()[:16]

    def update(self, token_id: int, logprob_q: int) -> str:
        self.state = hashlib.sha256(self.state + struct.pack("<Ii", token_id, logprob_q)).digest()[:16]
        return self.state.hex()

    @property
    def hex(self) -> str:
        return self.state.hex()


def commitment_of(request_id: str, token_ids: list[int], logprobs_q: list[int]) -> str:
    c = TokenCommitment(request_id)
    for t, lp in zip(token_ids, logprobs_q, strict=True):
        c.update(t, lp)
    return c.hex


def quantize_logprob(logprob: float) -> int:
    return int(round(max(logprob, -1e5) * LOGPROB_SCALE))
