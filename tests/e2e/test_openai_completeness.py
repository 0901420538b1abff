"""Issue 16 item 3 end to end: `agora serve` and a real `agora node` on the built-in engine,
driven by the official `openai` client — log-probs (chat and completions, whole and
streamed), `n` choices billed per choice with the ledger summing to zero, `user` and
`metadata` kept on the request, refusals by name."""

from __future__ import annotations

import os

import httpx
import openai
import pytest
from sqlmodel import Session, create_engine

from pricing.ledger import total_balance
from tests.e2e.market import Market, settled_balance

pytestmark = pytest.mark.slow
MSG = [{"role": "user", "content": "tell me about markets"}]


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    home = tmp_path_factory.mktemp("market")
    env = {**os.environ, "AGORA_HOME": str(home), "AGORA_NODE_HEARTBEAT_INTERVAL_S": "1",
           "AGORA_ASSIGN_TIMEOUT_S": "5", "AGORA_ADMIN_TOKEN": "admin-e2e"}
    for name in ("AGORA_DATABASE_URL", "AGORA_BROKER_URL", "AGORA_REDIS_URL"):
        env.pop(name, None)
    m = Market(home=home, env=env)
    try:
        m.start_coordinator()
        m.start_node("node-a", price_in="0.10", price_out="0.20")
        m.wait_live("tiny", 1)
        yield m
    finally:
        m.stop()


def _key(market: Market, credit: int = 10**9) -> str:
    return market.agora("account", "create", "--credit", str(credit))


def _client(market: Market, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=market.base + "/v1", api_key=key, max_retries=0, timeout=60)


def _ledger_sum(market: Market) -> int:
    engine = create_engine(f"sqlite:///{market.home / 'agora.db'}")
    try:
        with Session(engine) as s:
            return total_balance(s)
    finally:
        engine.dispose()


def test_chat_logprobs_whole_and_streamed_agree_with_the_tokens(market):
    c = _client(market, _key(market))
    args = dict(model="tiny", messages=MSG, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    resp = c.chat.completions.create(**args)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert t.top_logprobs[0].logprob == t.logprob  # greedy: the chosen token is the likeliest
    streamed = [tok for ch in c.chat.completions.create(**args, stream=True)
                if ch.choices and ch.choices[0].logprobs for tok in ch.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = c.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None  # not asked: not sent


def test_completion_logprobs_in_the_legacy_shape(market):
    c = _client(market, _key(market))
    resp = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
    lp = resp.choices[0].logprobs
    assert "".join(lp.tokens) == resp.choices[0].text and len(lp.tokens) == resp.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs) and len(lp.top_logprobs) == len(lp.tokens)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == len("Once upon a time")
    assert all(b - a == len(t) for a, b, t in zip(lp.text_offset, lp.text_offset[1:], lp.tokens))


def test_n_choices_are_billed_as_the_sum_of_the_choices(market):
    key = _key(market)
    c = _client(market, key)
    before = settled_balance(market.base, key)
    raw = c.chat.completions.with_raw_response.create(model="tiny", messages=MSG, max_tokens=10, n=3, temperature=1.0)
    resp = raw.parse()
    assert [ch.index for ch in resp.choices] == [0, 1, 2]
    assert all(isinstance(ch.message.content, str) for ch in resp.choices)
    cost = resp.usage.model_extra["cost_nano_usd"]
    after = settled_balance(market.base, key)
    assert before - after == cost > 0  # charged exactly the reported sum, every hold released
    ids = raw.headers["X-Agora-Choice-Request-Ids"].split(",")
    assert len(ids) == 3 and ids[0] == resp.id
    records = [httpx.get(market.base + f"/v1/requests/{rid}", headers={"Authorization": f"Bearer {key}"}).json()
               for rid in ids]  # each choice is its own request, settled on its own
    assert sum(r["completion_tokens"] for r in records) == resp.usage.completion_tokens
    assert sum(r["cost_nano_usd"] for r in records) == cost
    assert all(r["ledger"]["charged_nano_usd"] == r["cost_nano_usd"] for r in records)
    assert _ledger_sum(market) == 0

    chunks = list(c.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, n=3, stream=True,
                                            stream_options={"include_usage": True}))
    texts = {0: "", 1: "", 2: ""}
    for ch in chunks:
        for choice in ch.choices:
            texts[choice.index] += choice.delta.content or ""
    finishes = [choice.index for ch in chunks for choice in ch.choices if choice.finish_reason]
    assert sorted(finishes) == [0, 1, 2] and chunks[-1].usage.completion_tokens >= 3
    streamed_cost = chunks[-1].usage.model_extra["cost_nano_usd"]
    assert after - settled_balance(market.base, key) == streamed_cost
    assert _ledger_sum(market) == 0


def test_user_and_metadata_are_on_the_request_record(market):
    key = _key(market)
    resp = _client(market, key).chat.completions.create(model="tiny", messages=MSG, max_tokens=3, user="u-42",
                                                        metadata={"job": "nightly"}, store=True)
    rec = httpx.get(market.base + f"/v1/requests/{resp.id}", headers={"Authorization": f"Bearer {key}"}).json()
    assert rec["user"] == "u-42" and rec["metadata"] == {"job": "nightly"}


def test_refused_parameters_name_themselves_and_cost_nothing(market):
    key = _key(market)
    c = _client(market, key)
    for args, param in ((dict(response_format={"type": "json_object"}), "response_format"),
                        (dict(presence_penalty=1.0), "presence_penalty"), (dict(n=50), "n")):
        with pytest.raises(openai.BadRequestError) as exc:
            c.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, **args)
        assert exc.value.body["param"] == param
    assert settled_balance(market.base, key) == 10**9
