"""The OpenAI Batch API's objects: uploaded files, batches and each batch's lines.

A file's bytes live in the file store (`coordinator/file_store.py`); its row says whose it
is and what it holds. A batch's lines are rows of their own (index, custom_id, state, the
attempt whose idempotency key the line's market request carries, and its result), so a
runner that resumes a batch after a restart knows exactly which lines are done.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, PrimaryKeyConstraint
from sqlmodel import Field, SQLModel

from coordinator.models.account import utcnow


class BatchFile(SQLModel, table=True):
    __tablename__ = "batch_files"

    id: str = Field(primary_key=True, max_length=40)  # file-...
    account_id: str = Field(foreign_key="accounts.id", index=True)
    purpose: str = Field(max_length=32)  # batch | batch_output
    filename: str = Field(max_length=255)
    bytes: int = 0
    lines: int = 0
    created_at: datetime = Field(default_factory=utcnow)


class Batch(SQLModel, table=True):
    __tablename__ = "batches"

    id: str = Field(primary_key=True, max_length=40)  # batch_...
    account_id: str = Field(foreign_key="accounts.id", index=True)
    endpoint: str = Field(max_length=64)
    model: str = Field(max_length=200)
    input_file_id: str = Field(max_length=40)
    completion_window: str = Field(default="24h", max_length=8)
    status: str = Field(default="validating", max_length=16, index=True)
    output_file_id: str | None = Field(default=None, max_length=40)
    error_file_id: str | None = Field(default=None, max_length=40)
    total: int = 0
    completed: int = 0
    failed: int = 0
    meta: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))  # the buyer's `metadata`
    errors: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON))
    # Which runner works on it (an API replica id) and until when: another may take over after
    lease_owner: str | None = Field(default=None, max_length=32)
    lease_until: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)
    expires_at: datetime
    in_progress_at: datetime | None = None
    finalizing_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    expired_at: datetime | None = None
    cancelling_at: datetime | None = None
    cancelled_at: datetime | None = None


class BatchLine(SQLModel, table=True):
    __tablename__ = "batch_lines"
    __table_args__ = (PrimaryKeyConstraint("batch_id", "idx"),)

    batch_id: str = Field(foreign_key="batches.id", max_length=40)
    idx: int
    custom_id: str = Field(max_length=512)
    state: str = Field(default="pending", max_length=16)  # pending | running | done | failed
    attempt: int = 0  # part of the line's idempotency key: a new attempt only after one that charged nothing
    request_id: str | None = Field(default=None, max_length=40)
    status_code: int | None = None
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))  # response body or error
    finished_at: datetime | None = None
