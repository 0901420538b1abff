"""Inference requests through their life, and the signed receipts that end them."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, UniqueConstraint, false
from sqlmodel import Field, SQLModel

from coordinator.models.account import utcnow


class RequestStatus(str, enum.Enum):
    QUEUED = "queued"  # held, waiting for the scheduler
    ASSIGNED = "assigned"  # a node and its price are locked
    RUNNING = "running"  # tokens are flowing
    SETTLING = "settling"  # receipt accepted and stored; the settle task pays it
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"  # no node can satisfy it
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = {RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.REJECTED, RequestStatus.CANCELLED}


class InferenceRequest(SQLModel, table=True):
    __tablename__ = "inference_requests"
    __table_args__ = (UniqueConstraint("account_id", "idempotency_key", name="uq_request_idempotency"),)

    id: str = Field(primary_key=True, max_length=40)
    account_id: str = Field(foreign_key="accounts.id", index=True)
    model: str = Field(max_length=200, index=True)
    kind: str = Field(max_length=16)  # chat | completion
    status: RequestStatus = Field(default=RequestStatus.QUEUED, index=True)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    routing: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    idempotency_key: str | None = Field(default=None, max_length=160)
    response: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))  # kept for keyed replays
    prompt_tokens_est: int
    max_tokens: int
    hold_id: int | None = None
    hold_amount: int = Field(default=0, sa_type=BigInteger)  # nano-USD (64-bit, like every amount)
    node_id: str | None = Field(default=None, index=True)
    price_in: int | None = Field(default=None, sa_type=BigInteger)  # locked at assignment
    price_out: int | None = Field(default=None, sa_type=BigInteger)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: int | None = Field(default=None, sa_type=BigInteger)  # nano-dollars charged
    # What the buyer's handler wrote to the buyer (see coordinator/delivery.py); settlement
    # waits for it and charges only these tokens.
    delivered_tokens: int | None = None
    delivery: str | None = Field(default=None, max_length=16)
    replica_id: str | None = Field(default=None, max_length=32, index=True)  # the API process serving the buyer
    finish_reason: str | None = None
    error: str | None = None
    # the buyer's own labels, as OpenAI takes them (`user`, `metadata`); shown on GET /v1/requests/{id}
    buyer_user: str | None = Field(default=None, max_length=256)
    buyer_metadata: dict[str, str] | None = Field(default=None, sa_column=Column(JSON))
    # served from the response cache (response_cache.py): no node, no hold; `cost` is the cache price
    cached: bool = Field(default=False, sa_column_kwargs={"server_default": false()})
    created_at: datetime = Field(default_factory=utcnow, index=True)
    assigned_at: datetime | None = None
    first_token_at: datetime | None = None
    finished_at: datetime | None = Field(default=None, index=True)


class ReceiptRecord(SQLModel, table=True):
    """A node's signed receipt, stored as sent so it can be re-verified later."""

    __tablename__ = "receipts"

    request_id: str = Field(primary_key=True, foreign_key="inference_requests.id")
    node_id: str = Field(index=True, max_length=64)
    prompt_tokens: int
    completion_tokens: int
    commitment: str = Field(max_length=64)
    finish_reason: str = Field(max_length=32)
    signature: str = Field(max_length=128)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow)
