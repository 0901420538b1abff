"""A buyer who aborts a stream pays only for the tokens delivered, at the locked price;
the rest of the hold comes back and the node stops generating."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.e2e.market import embedded_market, settled_balance

pytestmark = pytest.mark.slow


def test_aborted_stream_is_charged_only_for_delivered_tokens(tmp_path):
    with embedded_market(tmp_path) as m:
        m.start_node("slow", extra=("--max-tokens-per-s", "25"))
        m.wait_live("tiny", 1)
        key = m.agora("account", "create", "--credit", str(10**9))
        auth = {"Authorization": f"Bearer {key}"}
        c = openai.OpenAI(base_url=m.base + "/v1", api_key=key, max_retries=0)
        stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go on"}],
                                           max_tokens=200, temperature=0, stream=True)
        rid = None
        for i, chunk in enumerate(stream):
            rid = chunk.id
            if i == 5:
                break
        stream.close()  # the buyer walks away after a few tokens
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            req = httpx.get(f"{m.base}/v1/requests/{rid}", headers=auth).json()
            if req["status"] == "completed":
                break
            time.sleep(0.2)
        assert req["status"] == "completed" and req["finish_reason"] == "cancelled", req
        assert 5 <= req["completion_tokens"] < 100
        expected = (req["prompt_tokens"] * req["price_in"] + req["completion_tokens"] * req["price_out"]) // 10**6
        assert req["cost_nano_usd"] == expected < req["hold_nano_usd"]
        assert req["delivery"] == "buyer_gone" and req["delivered_tokens"] == req["completion_tokens"]
        assert req["ledger"]["charged_nano_usd"] == expected and not req["ledger"]["pending"]
        bal = settled_balance(m.base, key)
        assert bal == 10**9 - expected
        other = m.agora("account", "create")
        assert httpx.get(f"{m.base}/v1/requests/{rid}",
                         headers={"Authorization": f"Bearer {other}"}).status_code == 404
