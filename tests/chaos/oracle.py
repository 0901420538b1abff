"""What an honest greedy node says to a prompt, token by token: the oracle the chaos tests
compare a buyer's received text and charge against (greedy output is the same on every
honest node, also across a failover)."""

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
