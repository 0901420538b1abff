"""The response cache through the official `openai` client on a live market (a real seller on
the built-in engine), embedded (SQLite, cache in memory) and on the production path
(PostgreSQL, cache and relay in Redis): a repeated deterministic request is answered
without a node, marked cached, counted apart in usage, charged the cache price (nothing by
default, exactly the price otherwise, balances summing to zero); any other request, another
account's, a non-deterministic one or one that opts out goes to the market; an
Idempotency-Key replay and a cache hit stay different things."""

from __future__ import annotations

import time
import uuid

import httpx
import openai
import pytest

from coordinator.account_service import create_account
from coordinator.models import Account
from pricing.ledger import Ledger, total_balance
from tests.coordinator.test_metrics import LiveMarket
from tests.e2e.market import settled_balance

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module", params=["sqlite", "postgres+redis"])
def live(request, tmp_path_factory):
    over = {"inline_dispatch": True}
    if request.param != "sqlite":
        pg = request.getfixturevalue("pg_url_module")
        from tests.conftest import REDIS_URL, _need

        _need("127.0.0.1", 6379, "Redis")
        over |= {"database_url": pg, "redis_url": REDIS_URL, "redis_prefix": f"agora-rc-{uuid.uuid4().hex[:8]}:"}
    m = LiveMarket(tmp_path_factory.mktemp("cache"), **over)
    try:
        m.wait(lambda: m.server.started, "the coordinator to start", 20)
        m.start_agents()
        m.wait(lambda: any(x["id"] == "tiny" and x["live_nodes"] >= 1
                           for x in httpx.get(m.base + "/v1/models").json()["data"]), "a live seller")
        yield m
    finally:
        m.stop()


def buyer(live, cache: bool = True, credit: int = 10**12) -> str:
    with live.rt.session() as s:
        _, key = create_account(s, "buyer", credit)
    if cache:  # the owner opts in through the accounts API
        r = httpx.patch(live.base + "/v1/account", json={"response_cache": True}, headers=auth(key))
        assert r.status_code == 200 and r.json()["response_cache"] is True
    return key


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def official(live, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.base + "/v1", api_key=key, max_retries=0, timeout=60)


def ask(live, key, headers=None, **over):
    """(response, its HTTP headers) of a chat completion through the official client."""
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 8, "temperature": 0, **over}
    raw = official(live, key).chat.completions.with_raw_response.create(**body, extra_headers=headers or {})
    return raw.parse(), raw.headers


def hit(headers) -> bool:
    return headers.get("x-agora-cache") == "hit"


def test_a_repeated_request_is_answered_from_the_cache_marked_and_free_by_default(live):
    key = buyer(live)
    first, h = ask(live, key)
    assert not hit(h) and first.usage.model_extra["cost_nano_usd"] > 0
    before = settled_balance(live.base, key)
    again, h = ask(live, key)
    assert hit(h) and h["x-agora-request-id"] == again.id != first.id
    assert float(h["server-timing"].split("dur=")[1]) < 1000
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.choices[0].finish_reason == first.choices[0].finish_reason
    u = again.usage
    assert (u.prompt_tokens, u.completion_tokens) == (first.usage.prompt_tokens, first.usage.completion_tokens)
    assert u.model_extra["cached"] is True and u.model_extra["cost_nano_usd"] == 0
    # streamed too, with the usage chunk last
    chunks = list(official(live, key).chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first.choices[0].message.content
    assert chunks[-1].usage.model_extra["cached"] is True and chunks[-1].usage.completion_tokens == u.completion_tokens
    # the legacy completions endpoint, with its own key
    c = official(live, key).completions
    done = c.create(model="tiny", prompt="once upon", max_tokens=6, temperature=0)
    raw = c.with_raw_response.create(model="tiny", prompt="once upon", max_tokens=6, temperature=0)
    assert hit(raw.headers) and raw.parse().choices[0].text == done.choices[0].text
    # hits cost nothing at the default price: only the completion that went to the market was paid
    assert settled_balance(live.base, key) == before - done.usage.model_extra["cost_nano_usd"]
    # the buyer's usage counts them apart; the record of a hit names no node
    deadline = time.monotonic() + 10
    while (usage := httpx.get(live.base + "/v1/account/usage", headers=auth(key)).json())["cached_requests"] < 3:
        assert time.monotonic() < deadline, usage
        time.sleep(0.05)
    row = usage["models"][0]
    assert (row["requests"], row["completed"], row["cached_requests"]) == (5, 2, 3)
    assert row["cached_completion_tokens"] == 2 * u.completion_tokens + done.usage.completion_tokens
    rec = httpx.get(f"{live.base}/v1/requests/{again.id}", headers=auth(key)).json()
    assert (rec["status"], rec["node_id"], rec["cost_nano_usd"]) == ("completed", None, 0)
    assert any(r["cached"] and r["id"] == again.id for r in usage["recent"])


@pytest.mark.parametrize("change", [{"max_tokens": 7}, {"stop": ["zz"]}, {"top_p": 0.5}, {"seed": 3},
                                    {"messages": [{"role": "user", "content": "hello there!"}]}])
def test_a_request_that_differs_in_anything_that_shapes_the_answer_is_a_miss(live, change):
    key = buyer(live)
    ask(live, key)
    _, h = ask(live, key, **change)
    assert not hit(h)


def test_non_deterministic_requests_are_never_cached(live):
    key = buyer(live)
    for _ in range(2):
        _, h = ask(live, key, temperature=1.0)
        assert not hit(h)
    _, h = ask(live, key, temperature=1.0, seed=42)
    _, h = ask(live, key, temperature=1.0, seed=42)
    assert hit(h)  # a seed makes it repeatable


def test_another_account_sending_the_same_request_gets_a_miss_and_pays_the_market(live):
    a, b = buyer(live), buyer(live)
    ask(live, a)
    assert hit(ask(live, a)[1])
    before = settled_balance(live.base, b)
    resp, h = ask(live, b)
    assert not hit(h) and resp.usage.model_extra.get("cached") is None
    assert settled_balance(live.base, b) == before - resp.usage.model_extra["cost_nano_usd"] < before


def test_the_header_overrides_the_accounts_default(live):
    on, off = buyer(live), buyer(live, cache=False)
    ask(live, off)
    assert not hit(ask(live, off)[1])  # not opted in: nothing was kept
    ask(live, off, headers={"X-Agora-Cache": "use"})
    assert hit(ask(live, off, headers={"X-Agora-Cache": "use"})[1])
    ask(live, on)
    assert not hit(ask(live, on, headers={"X-Agora-Cache": "skip"})[1])
    assert not hit(ask(live, on, headers={"X-Agora-Cache": "refresh"})[1])  # asks the market, keeps the new answer
    assert hit(ask(live, on)[1])
    with pytest.raises(openai.BadRequestError) as exc:
        ask(live, on, headers={"X-Agora-Cache": "sometimes"})
    assert exc.value.body["param"] == "X-Agora-Cache"


@pytest.fixture
def priced(live):
    s = live.rt.settings
    s.response_cache_price_per_request, s.response_cache_price_per_mtok = 5_000, 2_000_000
    yield 5_000, 2_000_000
    s.response_cache_price_per_request = s.response_cache_price_per_mtok = 0


def test_a_priced_hit_is_charged_exactly_once_to_the_platform_and_idempotency_stays_apart(live, priced):
    per_request, per_mtok = priced
    key = buyer(live)
    first, h = ask(live, key, headers={"Idempotency-Key": "k1"})
    assert not hit(h)
    replay, h = ask(live, key, headers={"Idempotency-Key": "k1"})  # a replay of the market's answer: not a hit
    assert h.get("x-agora-replay") == "true" and not hit(h) and replay.id == first.id
    before = settled_balance(live.base, key)
    again, h = ask(live, key, headers={"Idempotency-Key": "k2"})
    tokens = first.usage.prompt_tokens + first.usage.completion_tokens
    price = per_request + tokens * per_mtok // 10**6
    assert hit(h) and again.usage.model_extra["cost_nano_usd"] == price
    assert settled_balance(live.base, key) == before - price
    twice, h = ask(live, key, headers={"Idempotency-Key": "k2"})  # the retry replays the hit: no second charge
    assert h.get("x-agora-replay") == "true" and twice.id == again.id and twice.usage.model_extra["cached"]
    assert settled_balance(live.base, key) == before - price
    rec = httpx.get(f"{live.base}/v1/requests/{again.id}", headers=auth(key)).json()
    assert rec["cost_nano_usd"] == rec["ledger"]["charged_nano_usd"] == price
    with live.rt.session() as s:
        assert total_balance(s) == 0


def test_a_buyer_who_cannot_pay_the_cache_price_is_refused_with_402(live, priced):
    key = buyer(live)
    first, _ = ask(live, key)
    balance = settled_balance(live.base, key)
    account_id = httpx.get(live.base + "/v1/account", headers=auth(key)).json()["id"]
    with live.rt.session() as s:  # spend all but less than the cache price
        acct = s.get(Account, account_id)
        Ledger(s).charge(acct.ledger_account_id, balance - 10, kind="cache", idempotency_key=f"drain:{acct.id}")
    with pytest.raises(openai.APIStatusError) as exc:
        ask(live, key)
    assert exc.value.status_code == 402
    assert settled_balance(live.base, key) == 10
