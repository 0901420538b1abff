"""Mid-stream failover with real node agent processes: the node serving a stream is
killed; the buyer's stream continues on another node and reads exactly like a run on a
single node; each node is paid for the tokens it delivered."""

from __future__ import annotations

import os
import signal

import openai
import pytest
import sqlalchemy as sa

from tests.e2e.market import embedded_market

pytestmark = pytest.mark.slow


@pytest.fixture
def market(tmp_path):
    with embedded_market(tmp_path, AGORA_TOKEN_TIMEOUT_S="5") as m:
        yield m


@pytest.mark.parametrize("failure", ["killed", "stalled"])
def test_failed_node_stream_continues_on_another_node(market, failure):
    slow = market.start_node("slow-cheap", price_in="0.05", price_out="0.10",
                             extra=("--max-tokens-per-s", "20"))
    market.start_node("fast-dear", price_in="0.20", price_out="0.40")
    market.wait_live("tiny", 2)
    key = market.agora("account", "create", "--credit", str(10**9))
    c = openai.OpenAI(base_url=market.base + "/v1", api_key=key, max_retries=0, timeout=60)
    args = dict(model="tiny", messages=[{"role": "user", "content": "a long story please"}],
                max_tokens=60, temperature=0)
    stream = c.chat.completions.create(**args, stream=True, stream_options={"include_usage": True},
                                       extra_body={"routing": {"sort": "price"}})
    parts, usage, seen = [], None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        parts.append(chunk.choices[0].delta.content or "")
        seen += 1
        if seen == 10:  # the cheap node dies (or hangs, connection open) mid-stream
            os.killpg(slow.pid, signal.SIGKILL if failure == "killed" else signal.SIGSTOP)
    text = "".join(parts)
    if failure == "stalled":
        os.killpg(slow.pid, signal.SIGKILL)
        slow.wait()
    assert slow.poll() is not None
    reference = c.chat.completions.create(**args)  # only the fast node is left
    assert text == reference.choices[0].message.content
    assert usage.completion_tokens == reference.usage.completion_tokens
    # both nodes were paid: the cheap one for what it delivered before dying
    engine = sa.create_engine(f"sqlite:///{market.home / 'agora.db'}")
    with engine.connect() as conn:
        earnings = dict(conn.execute(sa.text(
            "SELECT n.id, a.balance FROM nodes n JOIN ledger_accounts a ON a.id = n.earnings_account_id")).all())
        total = conn.execute(sa.text("SELECT SUM(balance) FROM ledger_accounts")).scalar()
    engine.dispose()
    assert len(earnings) == 2 and all(v > 0 for v in earnings.values()), earnings
    assert total == 0
    cost = usage.model_extra["cost_nano_usd"]
    assert 0 < cost < reference.usage.model_extra["cost_nano_usd"]  # part of it at the cheaper price
