"""Helpers of the chaos suite: what an honest greedy node says to a prompt, token by token
(the oracle a buyer's received text and charge are compared against: greedy output is the
same on every honest node, also across a failover), and a production-path environment."""

from __future__ import annotations

import asyncio

from node_agent.engines.base import GenerationRequest, SamplingParams
from node_agent.engines.builtin.engine import BuiltinEngine
from node_agent.tiny_model import resolve_model


def greedy_token_texts(messages: list[dict], max_tokens: int, model: str = "tiny") -> list[str]:
    """The text each generated token adds, in order, for a chat request at temperature 0."""
    engine = BuiltinEngine(resolve_model(model), max_batch=1)

    async def run() -> list[str]:
        await engine.start()
        try:
            ids = engine.encode(engine.render_chat(messages))
            out = []
            async for ev in engine.generate(GenerationRequest("oracle", ids, SamplingParams(
                    max_tokens=max_tokens, temperature=0.0))):
                out.append(ev.text)
            return out
        finally:
            await engine.close()

    return asyncio.run(run())


def charged_text(token_texts: list[str], tokens: int) -> str:
    """The text of the first `tokens` tokens: what a buyer charged for that many received."""
    return "".join(token_texts[:tokens])


def production_env(home, pg_url: str, redis_url: str, **settings: str) -> dict[str, str]:
    """The environment of a production-path market on a Redis of the test's own (broker and
    relay) and a fresh PostgreSQL database, with the given AGORA_* settings on top."""
    import os
    import uuid

    env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
    env.update({"AGORA_HOME": str(home), "AGORA_DATABASE_URL": pg_url, "AGORA_BROKER_URL": redis_url,
                "AGORA_REDIS_URL": redis_url, "AGORA_CELERY_QUEUE": f"agora-chaos-{uuid.uuid4().hex[:8]}",
                "AGORA_NODE_HEARTBEAT_INTERVAL_S": "1", "AGORA_MIN_STAKE_NANO_USD": "0"})
    env.update({f"AGORA_{k.upper()}": v for k, v in settings.items()})
    return env


def assert_books_closed(pg_url: str, settle_within_s: float = 60.0) -> None:
    """The ledger sums to zero, every hold resolves (settled or voided) within the bound, and
    no request was held twice."""
    import time

    import sqlalchemy as sa

    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT SUM(balance) FROM ledger_accounts")).scalar() == 0
            deadline = time.monotonic() + settle_within_s
            while conn.execute(sa.text("SELECT COUNT(*) FROM ledger_holds WHERE state = 'PENDING'")).scalar():
                assert time.monotonic() < deadline, f"a hold is still pending {settle_within_s:.0f}s later"
                time.sleep(0.5)
                conn.rollback()
            assert conn.execute(sa.text(
                "SELECT COUNT(*) FROM (SELECT request_ref FROM ledger_transfers WHERE kind = 'hold' "
                "GROUP BY request_ref HAVING COUNT(*) > 1) d")).scalar() == 0  # one hold, one charge per request
    finally:
        engine.dispose()
