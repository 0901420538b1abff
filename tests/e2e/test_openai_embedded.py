"""End to end on the embedded default: `agora serve` (SQLite, in-process Celery worker)
and a real `agora node` process on the built-in engine, driven by the official `openai`
client: models, chat and completions (whole and streamed), every error case."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.e2e.market import Market, settled_balance


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    home = tmp_path_factory.mktemp("market")
    env = {**__import__("os").environ, "AGORA_HOME": str(home), "AGORA_NODE_HEARTBEAT_INTERVAL_S": "1",
           "AGORA_ASSIGN_TIMEOUT_S": "5", "AGORA_ADMIN_TOKEN": "admin-e2e"}
    env.pop("AGORA_DATABASE_URL", None)
    env.pop("AGORA_BROKER_URL", None)
    env.pop("AGORA_REDIS_URL", None)
    m = Market(home=home, env=env)
    try:
        m.start_coordinator()
        m.start_node("node-a", price_in="0.10", price_out="0.20")
        m.wait_live("tiny", 1)
        yield m
    finally:
        m.stop()


def funded_key(market: Market, credit: int = 10**9) -> str:
    return market.agora("account", "create", "--credit", str(credit))


def client(market: Market, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=market.base + "/v1", api_key=key, max_retries=0, timeout=60)


def balance(market: Market, key: str) -> int:
    return settled_balance(market.base, key)


def test_models_lists_live_offer_with_prices_and_speed(market):
    models = client(market, funded_key(market)).models.list()
    tiny = next(m for m in models.data if m.id == "tiny")
    extra = tiny.model_extra
    assert extra["live_nodes"] == 1
    assert extra["pricing"]["completion"] == [200_000_000, 200_000_000]
    assert extra["tokens_per_s"]["max"] > 0


def test_nodes_view_shows_measured_rtt_and_speed(market):
    client(market, funded_key(market)).completions.create(model="tiny", prompt="warm", max_tokens=16)
    nodes = httpx.get(market.base + "/v1/nodes").json()
    assert len(nodes) == 1 and nodes[0]["online"]
    assert nodes[0]["rtt_ms"] > 0  # measured by the coordinator's own ping on the channel
    offer = nodes[0]["offers"][0]
    assert offer["measured_tokens_per_s"] > 0 and offer["claim_ratio"] > 0


def test_chat_non_streaming_charges_reported_cost(market):
    key = funded_key(market)
    before = balance(market, key)
    resp = client(market, key).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=12, temperature=0)
    assert resp.object == "chat.completion"
    assert resp.choices[0].message.role == "assistant"
    assert isinstance(resp.choices[0].message.content, str)
    u = resp.usage
    assert 1 <= u.completion_tokens <= 12
    assert u.prompt_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    cost = u.model_extra["cost_nano_usd"]
    assert cost == (u.prompt_tokens * 100_000_000 + u.completion_tokens * 200_000_000) // 10**6
    assert balance(market, key) == before - cost


def test_chat_streaming_arrives_incrementally_with_usage_last(market):
    stream = client(market, funded_key(market)).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=24,
        temperature=0, stream=True, stream_options={"include_usage": True})
    arrivals, texts, usage, finish = [], [], None, None
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        delta = chunk.choices[0].delta
        if delta.content:
            texts.append(delta.content)
        finish = chunk.choices[0].finish_reason or finish
    assert len(texts) >= 2, "tokens must arrive as separate chunks"
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens >= len(texts)


def test_greedy_is_deterministic_and_stream_equals_whole(market):
    c = client(market, funded_key(market))
    args = dict(model="tiny", messages=[{"role": "user", "content": "abc"}], max_tokens=16, temperature=0)
    whole = c.chat.completions.create(**args).choices[0].message.content
    assert c.chat.completions.create(**args).choices[0].message.content == whole
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**args, stream=True)
                       if ch.choices)
    assert streamed == whole


def test_completions_whole_and_streamed(market):
    c = client(market, funded_key(market))
    resp = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert resp.object == "text_completion" and resp.usage.completion_tokens >= 1
    text = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert text == resp.choices[0].text


def test_stop_sequence_and_max_tokens(market):
    c = client(market, funded_key(market))
    resp = c.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=0)
    assert resp.usage.completion_tokens == 5 and resp.choices[0].finish_reason == "length"
    full = c.completions.create(model="tiny", prompt="x", max_tokens=20, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    if stop.strip():
        cut = c.completions.create(model="tiny", prompt="x", max_tokens=20, temperature=0, stop=[stop])
        assert stop not in cut.choices[0].text
        assert full.startswith(cut.choices[0].text)


def test_bad_key_is_401(market):
    with pytest.raises(openai.AuthenticationError):
        client(market, "sk-agora-wrong").chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}])


def test_unknown_model_is_404(market):
    with pytest.raises(openai.NotFoundError) as exc:
        client(market, funded_key(market)).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert exc.value.body["code"] == "model_not_found"


def test_bad_params_are_400(market):
    c = client(market, funded_key(market))
    for bad in (dict(max_tokens=-1), dict(max_tokens=10**9), dict(temperature=5), dict(messages=[]),
                dict(max_tokens=100_000)):
        args = dict(model="tiny", messages=[{"role": "user", "content": "hi"}])
        args.update(bad)
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(**args)


def test_insufficient_balance_is_402_and_nothing_is_charged(market):
    key = funded_key(market, credit=10)
    with pytest.raises(openai.APIStatusError) as exc:
        client(market, key).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=64)
    assert exc.value.status_code == 402
    assert balance(market, key) == 10


def test_a_max_price_no_node_meets_is_400_not_retried(market):
    """A constraint nobody meets is the buyer's to change: a 4xx with the reason, which the
    official client does not retry (it retries every 5xx)."""
    with pytest.raises(openai.BadRequestError) as exc:
        client(market, funded_key(market)).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], extra_body={"routing": {"max_price": 1}})
    assert exc.value.body["code"] == "no_node_within_max_price" and "max_price" in exc.value.message


def test_malformed_bodies_never_500(market):
    key = funded_key(market)
    h = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    cases = [b"{not json", b"[]", b'{"model": "tiny"}', b'{"messages": [{"role": "user", "content": "x"}]}',
             b'{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}',
             b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}',
             b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}',
             b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "routing": {"sort": "vibes"}}']
    for body in cases:
        r = httpx.post(market.base + "/v1/chat/completions", content=body, headers=h)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(market.base + "/v1/completions", content=b'{"model": "tiny", "prompt": ["a", "b"]}', headers=h)
    assert r.status_code == 400


def test_idempotency_key_replays_the_first_answer_without_charging_again(market):
    key = funded_key(market)
    c = client(market, key)
    args = dict(model="tiny", messages=[{"role": "user", "content": "once"}], max_tokens=6, temperature=0)
    first = c.chat.completions.create(**args, extra_headers={"Idempotency-Key": "job-1"})
    after_first = balance(market, key)
    again = c.chat.completions.create(**args, extra_headers={"Idempotency-Key": "job-1"})
    assert again.id == first.id and again.choices[0].message.content == first.choices[0].message.content
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        **args, stream=True, extra_headers={"Idempotency-Key": "job-1"}) if ch.choices)
    assert streamed == first.choices[0].message.content
    assert balance(market, key) == after_first  # replays are free
    with pytest.raises(openai.ConflictError):
        c.chat.completions.create(**{**args, "max_tokens": 7}, extra_headers={"Idempotency-Key": "job-1"})


def test_prometheus_metrics_count_requests_and_tokens(market):
    c = client(market, funded_key(market))
    c.completions.create(model="tiny", prompt="m", max_tokens=4, temperature=0)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="m")
    text = httpx.get(market.base + "/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['agora_requests_total{outcome="200"}'] >= 1
    assert values['agora_requests_total{outcome="404"}'] >= 1
    assert values["agora_tokens_relayed_total"] >= 4
    assert values["agora_nodes_online"] == 1


def test_operator_dashboard_shows_price_against_measured_speed(market):
    c = client(market, funded_key(market))
    c.completions.create(model="tiny", prompt="dash", max_tokens=8, temperature=0)
    assert httpx.get(market.base + "/dashboard").status_code == 303  # to the login page
    assert httpx.get(market.base + "/dashboard.json", headers={"Authorization": "Bearer wrong"}).status_code == 403
    data = httpx.get(market.base + "/dashboard.json", headers={"Authorization": "Bearer admin-e2e"}).json()
    node = data["nodes"][0]
    assert node["online"] and node["price_out_usd_per_mtok"] == 0.2 and node["measured_tokens_per_s"] > 0
    assert node["jobs_window"] >= 1 and data["tokens_window"] >= 8 and data["platform_fees_usd"] > 0
    with httpx.Client(base_url=market.base) as browser:
        assert browser.post("/login", data={"credential": "admin-e2e"}).status_code == 303
        page = browser.get("/dashboard")
    assert page.status_code == 200 and 'id="price-perf"' in page.text and "measured tok/s" in page.text
