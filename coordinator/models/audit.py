"""Audits: a sample of finished jobs re-checked by a verifier node, kept with their evidence
(both log-prob vectors) as the dispute record the operator and the seller can see."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from coordinator.models.account import utcnow


class AuditStatus(str, enum.Enum):
    PENDING = "pending"  # waiting for a verifier
    SENT = "sent"  # with a verifier
    PASSED = "passed"
    FAILED = "failed"
    EXPIRED = "expired"  # no capable verifier answered within audit_expiry_s: counted, never judged


class Audit(SQLModel, table=True):
    __tablename__ = "audits"
    __table_args__ = (UniqueConstraint("request_id", "segment", name="uq_audits_request_segment"),)

    id: int | None = Field(default=None, primary_key=True)
    request_id: str = Field(foreign_key="inference_requests.id", index=True)
    # Which part of the stream: 0 for a job one node served whole; after a failover, the
    # index of the node's segment in stream order (each segment is audited at its node's rate).
    segment: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    node_id: str = Field(index=True, max_length=64)
    verifier_id: str | None = Field(default=None, index=True, max_length=64)
    status: AuditStatus = Field(default=AuditStatus.PENDING, index=True)
    claimed: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON))  # ids, logprobs_q
    evidence: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))  # the verifier's rescore
    verdict: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    consequences: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    created_at: datetime = Field(default_factory=utcnow, index=True)
    sent_at: datetime | None = None
    resolved_at: datetime | None = None
