"""Nodes (sellers' machines), what each offers, and the nonces each has used."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column
from sqlmodel import Field, SQLModel

from coordinator.models.account import utcnow


class NodeBase(SQLModel):
    name: str | None = Field(default=None, max_length=100)
    region: str = Field(max_length=64)
    max_concurrency: int
    engine: str = Field(default="builtin", max_length=40)


class Node(NodeBase, table=True):
    __tablename__ = "nodes"

    id: str = Field(primary_key=True, max_length=64, description="Ed25519 public key, hex")
    earnings_account_id: int
    benchmark: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    registered_at: datetime = Field(default_factory=utcnow)
    last_heartbeat_at: datetime | None = None
    channel_connected: bool = False
    online: bool = Field(default=False, index=True)
    banned: bool = False
    reputation: float = 0.5
    rtt_ms: float = 0.0
    failures: int = 0  # consecutive failures (stalled or lost streams)
    backoff_until: datetime | None = None  # no new work before this time
    operator: str | None = Field(default=None, max_length=64)
    jobs: int = 0  # completed requests
    audits_passed: int = 0
    audits_failed: int = 0
    passes_since_failure: int = 0
    last_canary_at: datetime | None = None
    verify_only: bool = False  # an operator-run verifier: never sold work
    channel_id: str | None = Field(default=None, max_length=32)  # the live work channel (newest wins)
    error_rate: float = 0.0  # EWMA of failed jobs (errors, stalls, lost streams) over its recent jobs
    excluded_reason: str | None = Field(default=None, max_length=200)  # why it is out of routing
    trusted: bool = False  # the operator's own verifier: its verdicts need no confirmation
    session_jobs: int = 0  # jobs since its agent last (re)connected (a restart may swap the model)
    verdicts_overturned: int = 0  # its failing verdicts a confirmation contradicted
    precision_cusum: float = 0.0  # evidence across audits that it serves int8 as bf16 (scheduler.evidence)


class NodePublic(NodeBase):
    id: str
    online: bool
    channel_connected: bool
    last_heartbeat_at: datetime | None
    reputation: float
    rtt_ms: float
    failures: int
    backoff_until: datetime | None
    banned: bool
    operator: str | None
    jobs: int
    audits_passed: int
    audits_failed: int
    verify_only: bool = False
    error_rate: float = 0.0
    excluded_reason: str | None = None
    routable: bool = False
    not_routable_because: str | None = None
    offers: list["NodeOfferPublic"] = []


class NodeOfferBase(SQLModel):
    model: str = Field(max_length=200, index=True)
    # nano-dollars per million tokens: 64-bit (a 32-bit column ends at $2.147 per million)
    price_in: int = Field(sa_type=BigInteger)  # prompt tokens
    price_out: int = Field(sa_type=BigInteger)  # completion tokens
    tokens_per_s: float  # advertised (benchmarked by the node)
    tokens_per_s_b1: float | None = None
    ttft_ms: float | None = None
    max_context: int = 2048
    dtype: str = Field(default="float32", max_length=16)
    quantization: str | None = Field(default=None, max_length=16)
    token_ids: bool = True  # its engine names its tokens
    logprobs: bool = True  # its engine reports per-token log-probs
    can_verify: bool = True  # its engine can rescore other nodes' jobs

    @property
    def verifiable(self) -> bool:
        """Its jobs can be audited (a verifier needs the token ids and their log-probs)."""
        return self.token_ids and self.logprobs


class NodeOffer(NodeOfferBase, table=True):
    __tablename__ = "node_offers"

    id: int | None = Field(default=None, primary_key=True)
    node_id: str = Field(foreign_key="nodes.id", index=True)
    measured_tokens_per_s: float | None = None  # learned from relayed traffic (per stream)
    measured_ttft_ms: float | None = None
    claim_ratio: float | None = None  # measured ÷ advertised (1.0 honest, < 1 over-claims)
    estimate: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))  # coordinator.speed


class NodeOfferPublic(NodeOfferBase):
    measured_tokens_per_s: float | None = None
    measured_ttft_ms: float | None = None
    claim_ratio: float | None = None  # measured ÷ advertised per-stream tok/s (1.0 = honest)


class NodeNonce(SQLModel, table=True):
    """A nonce seen in a signed message: a second use is a replay and is refused."""

    __tablename__ = "node_nonces"

    node_id: str = Field(primary_key=True, max_length=64)
    nonce: str = Field(primary_key=True, max_length=64)
    seen_at: datetime = Field(default_factory=utcnow, index=True)
