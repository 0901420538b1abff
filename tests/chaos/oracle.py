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
