"""API replicas: each `agora serve` process says it is alive here, so that the requests its
buyers' handlers were serving can be ended quickly when it dies."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from coordinator.models.account import utcnow


class ApiReplica(SQLModel, table=True):
    __tablename__ = "api_replicas"

    id: str = Field(primary_key=True, max_length=32)
    host: str = Field(default="", max_length=200)
    pid: int = 0
    started_at: datetime = Field(default_factory=utcnow)
    last_seen: datetime = Field(default_factory=utcnow, index=True)
