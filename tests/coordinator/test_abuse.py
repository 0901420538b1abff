"""Abuse is refused cheaply and clearly: oversized bodies (413 before they are read), text
no encoder accepts, empty prompts and out-of-range seeds (400, never a 5xx), rate limits per
API key and per node identity (429 in OpenAI's error body with Retry-After), refused signed
messages that still burn their nonce, and an OpenAPI document that declares it all."""

from __future__ import annotations

import json
import time

import openai
import pytest
from fastapi.testclient import TestClient

from coordinator.account_service import create_account
from node_agent.identity import Identity
from protocol import PayoutRequest, fresh_stamp
from tests.coordinator.test_node_identity import post, registration


@pytest.fixture
def key(runtime):
    with runtime.session() as s:
        _, key = create_account(s, "buyer", 10**9)
    return key


def _chat(client, key, **body):
    """A raw JSON body (ASCII escapes, so lone surrogates travel as \\ud800 like any client sends them)."""
    payload = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **body}
    return client.post("/v1/chat/completions", content=json.dumps(payload).encode(),
                       headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def test_an_oversized_body_is_refused_before_it_is_read(client, key):
    big = b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * (10 * 2**20) + b'"}]}'
    t0 = time.perf_counter()
    r = client.post("/v1/chat/completions", content=big,
                    headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert time.perf_counter() - t0 < 1.0
    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(12):
            yield b"x" * 2**20
    r = client.post("/v1/completions", content=chunks(), headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 413


@pytest.mark.parametrize("body", [
    {"messages": [{"role": "user", "content": "\ud800"}]},
    {"model": "ti\udfffny"},
    {"seed": 2**70},
    {"seed": -1},
    {"stop": ["\ud83d"]},
    {"routing": {"region": "\ud800"}},
])
def test_inputs_the_schema_refuses_are_400_never_5xx(client, key, body):
    r = _chat(client, key, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_an_empty_prompt_is_400(client, key):
    r = client.post("/v1/completions", headers={"Authorization": f"Bearer {key}"}, json={"model": "tiny", "prompt": ""})
    assert r.status_code == 400 and "empty" in r.json()["error"]["message"]


def test_rate_limits_per_key_are_429_with_retry_after_through_the_official_client(runtime, key):
    from coordinator.app import create_app

    runtime.settings.rate_limit_requests_per_min = 3
    with TestClient(create_app(runtime=runtime)) as c:
        oa = openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=c, max_retries=0)
        for _ in range(3):  # no node: 404 (unknown model), but each counts
            with pytest.raises(openai.NotFoundError):
                oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.RateLimitError) as exc:
            oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
        assert exc.value.body["code"] == "rate_limit_exceeded"
        assert 1 <= int(exc.value.response.headers["retry-after"]) <= 60
        with runtime.session() as s:
            _, other = create_account(s, "other", 10**9)
        r = _chat(c, other)  # another key has its own window
        assert r.status_code == 404


def test_a_request_bigger_than_the_token_limit_is_400_not_429(client, runtime, key):
    runtime.settings.rate_limit_tokens_per_min = 1000
    r = _chat(client, key, max_tokens=5000)
    assert r.status_code == 400 and r.json()["error"]["code"] == "request_exceeds_rate_limit"


def test_concurrent_requests_per_key_are_capped(runtime):
    runtime.settings.rate_limit_concurrent = 2
    lim = runtime.limiter
    assert lim.acquire("a", "r1") and lim.acquire("a", "r2") and not lim.acquire("a", "r3")
    assert lim.acquire("b", "r4")  # per key
    lim.release("a", "r1")
    assert lim.acquire("a", "r3")


def test_signed_messages_per_node_identity_are_rate_limited(client, runtime):
    runtime.settings.node_rate_limit_per_min = 2
    me = Identity.generate()
    assert post(client, "/v1/nodes/register", registration(me).sign(me)).status_code == 200
    from protocol import Heartbeat

    assert post(client, "/v1/nodes/heartbeat", Heartbeat(node_id=me.public_key_hex, **fresh_stamp()).sign(me)).status_code == 200
    r = post(client, "/v1/nodes/heartbeat", Heartbeat(node_id=me.public_key_hex, **fresh_stamp()).sign(me))
    assert r.status_code == 429 and "retry-after" in r.headers


def test_a_refused_signed_payout_still_burns_its_nonce(client, runtime):
    runtime.settings.challenge_window_s = 0
    me = Identity.generate()
    assert post(client, "/v1/nodes/register", registration(me).sign(me)).status_code == 200
    pay = PayoutRequest(node_id=me.public_key_hex, **fresh_stamp(), amount=10, idempotency_key="p").sign(me)
    assert post(client, "/v1/nodes/me/payouts", pay).status_code == 402  # nothing earned yet
    with runtime.session() as s:  # now it has earnings...
        from coordinator.models import Node
        from pricing.ledger import Ledger

        Ledger(s).deposit(s.get(Node, me.public_key_hex).earnings_account_id, 100, idempotency_key="e")
    r = post(client, "/v1/nodes/me/payouts", pay)  # ...but the captured bytes, replayed, move nothing
    assert r.status_code == 401 and r.json()["error"]["code"] == "replayed_nonce"


def test_the_openapi_document_declares_every_status_with_the_error_body(client):
    doc = client.get("/openapi.json").json()
    assert "Error" in doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert "422" not in codes, (path, method)
            assert {"400", "401", "404", "409", "413", "429", "503"} <= codes, (path, method)
            assert op["responses"]["429"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}


def test_a_broker_that_cannot_take_work_is_a_503_and_nothing_is_held(client, runtime, key):
    """The relay is up but the broker refuses the dispatch task: the request is not left
    admitted with its money held; the buyer gets a 503 with Retry-After."""
    from kombu.exceptions import OperationalError

    from coordinator.models import InferenceRequest, RequestStatus
    from sqlmodel import select
    from tests.coordinator.test_routability import _seller

    _seller(client, runtime)
    runtime.settings.inline_dispatch = False  # (an inline round needs no broker: see test_hot_path)
    import scheduler.tasks

    def refuse(*a, **kw):
        raise OperationalError("broker down")

    original = scheduler.tasks.dispatch.apply_async
    scheduler.tasks.dispatch.apply_async = refuse
    try:
        r = _chat(client, key, max_tokens=8)
    finally:
        scheduler.tasks.dispatch.apply_async = original
    assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "market_unavailable"
    import time

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the hold is released in the background at once
        with runtime.session() as s:
            reqs = s.exec(select(InferenceRequest)).all()
            if reqs and all(q.status == RequestStatus.CANCELLED for q in reqs):
                break
        time.sleep(0.05)
    with runtime.session() as s:
        from coordinator.models import Account
        from pricing.ledger import Ledger

        acct = s.exec(select(Account).where(Account.name == "buyer")).one()
        assert Ledger(s).held(acct.ledger_account_id) == 0


def test_a_rate_limiter_whose_redis_is_down_refuses_with_503_not_500(tmp_path, own_redis):
    """Redis killed: every limit check (buyer requests, concurrency, node messages,
    registrations) is a 503 the client retries, never a 500; back up, it counts again."""
    from coordinator.errors import Unavailable
    from coordinator.ratelimit import RateLimiter
    from coordinator.settings import CoordinatorSettings

    limiter = RateLimiter(CoordinatorSettings(home=tmp_path, redis_url=own_redis.url, rate_limit_concurrent=4))
    assert limiter.admit("acct", 10, "r1")
    own_redis.kill()
    try:
        for check in (lambda: limiter.admit("acct", 10, "r2"), lambda: limiter.acquire("acct", "r3"),
                      lambda: limiter.node_message("n"), lambda: limiter.registration("1.2.3.4")):
            with pytest.raises(Unavailable) as exc:
                check()
            assert exc.value.status_code == 503
    finally:
        own_redis.start()
    assert limiter.admit("acct", 10, "r4")
