"""Per-minute history for the dashboards: one row per model and minute (`market_minutes`) and
one per node, model and minute (`node_minutes`), written by the sweep (`coordinator.history`),
never per request, and pruned after `history_days`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Column, UniqueConstraint
from sqlmodel import Field, SQLModel


def _big() -> Column:
    return Column(BigInteger, nullable=False, default=0)


class MarketMinute(SQLModel, table=True):
    __tablename__ = "market_minutes"
    __table_args__ = (UniqueConstraint("minute", "model", name="uq_market_minute"),)

    id: int | None = Field(default=None, primary_key=True)
    minute: datetime = Field(index=True)  # start of the minute, UTC
    model: str = Field(max_length=200)
    nodes_live: int = 0  # routable offers of this model when the minute was recorded
    capacity: int = 0  # their summed max concurrency
    active: int = 0  # requests assigned or running on them then
    ask_out_p10: int | None = Field(default=None, sa_type=BigInteger)  # nano-USD per million completion tokens, live offers
    ask_out_p50: int | None = Field(default=None, sa_type=BigInteger)
    ask_out_p90: int | None = Field(default=None, sa_type=BigInteger)
    ask_in_p50: int | None = Field(default=None, sa_type=BigInteger)
    tok_s_p50: float | None = None  # measured per-stream tok/s over live offers
    tok_s_p90: float | None = None
    requests: int = 0  # ended in this minute, any outcome
    completed: int = 0
    failed: int = 0
    rejected: int = 0
    cancelled: int = 0
    failed_over: int = 0  # completed after at least one failover
    buyer_gone: int = 0  # the buyer left before its answer was written (charged for what it got)
    market_fault: int = 0  # the relay broke or the buyer's API process died (the market's loss)
    prompt_tokens: int = Field(default=0, sa_column=_big())
    completion_tokens: int = Field(default=0, sa_column=_big())
    volume: int = Field(default=0, sa_column=_big())  # nano-USD the buyers were charged
    fees: int = Field(default=0, sa_column=_big())  # nano-USD the platform kept
    ttft_p50_ms: float | None = None
    ttft_p90_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None  # per request: (last token − first token) / (tokens − 1)
    itl_p99_ms: float | None = None
    audits_passed: int = 0  # resolved in this minute
    audits_failed: int = 0


class NodeMinute(SQLModel, table=True):
    __tablename__ = "node_minutes"
    __table_args__ = (UniqueConstraint("minute", "node_id", "model", name="uq_node_minute"),)

    id: int | None = Field(default=None, primary_key=True)
    minute: datetime = Field(index=True)
    node_id: str = Field(max_length=64, index=True)
    model: str = Field(max_length=200)
    online: bool = False
    routable: bool = False
    price_in: int = Field(default=0, sa_type=BigInteger)
    price_out: int = Field(default=0, sa_type=BigInteger)
    tok_s: float | None = None  # measured per stream
    ttft_ms: float | None = None  # measured
    active: int = 0
    max_concurrency: int = 0
    requests: int = 0  # ended on it in this minute
    completed: int = 0
    failed: int = 0
    completion_tokens: int = Field(default=0, sa_column=_big())
    revenue: int = Field(default=0, sa_column=_big())  # nano-USD charged for its jobs
    audits_passed: int = 0
    audits_failed: int = 0
    reputation: float = 0.5
