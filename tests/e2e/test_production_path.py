"""The same end-to-end flow on the production path: PostgreSQL (schema by Alembic),
Redis or RabbitMQ as the Celery broker with a separate `agora worker` process, Redis as
the token relay, a real `agora node` process, and the official `openai` client."""

from __future__ import annotations

import os
import signal
import uuid

import httpx
import openai
import pytest

from tests.conftest import _need
from tests.e2e.market import Market, settled_balance

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

BROKERS = {
    "redis": ("redis://127.0.0.1:6379/0", 6379),
    "rabbitmq": ("amqp://guest:guest@127.0.0.1:5672//", 5672),
}


def production_env(home, pg_url: str, broker: str) -> dict[str, str]:
    """PostgreSQL, the broker, Redis relay; a queue and key prefix of this test's own."""
    tag = uuid.uuid4().hex[:8]
    return {**os.environ, "AGORA_HOME": str(home), "AGORA_DATABASE_URL": pg_url,
            "AGORA_BROKER_URL": broker, "AGORA_REDIS_URL": "redis://127.0.0.1:6379/0",
            "AGORA_CELERY_QUEUE": f"agora-test-{tag}", "AGORA_REDIS_PREFIX": f"agora-test-{tag}:",
            "AGORA_NODE_HEARTBEAT_INTERVAL_S": "1", "AGORA_ASSIGN_TIMEOUT_S": "10",
            "AGORA_MIN_STAKE_NANO_USD": "0"}  # stake is tested on its own; these tests are about the path


@pytest.fixture(params=sorted(BROKERS))
def market(request, tmp_path, pg_url):
    broker, port = BROKERS[request.param]
    _need("127.0.0.1", port, request.param)
    m = Market(home=tmp_path, env=production_env(tmp_path, pg_url, broker))
    try:
        m.agora("migrate")
        m.start_coordinator()
        m.start_worker()
        m.start_node("node-p", price_in="0.05", price_out="0.30", region="eu-west")
        m.wait_live("tiny", 1)
        yield m
    finally:
        m.stop()


def test_openai_flow_on_postgres_with_separate_worker(market):
    key = market.agora("account", "create", "--credit", str(10**9))
    c = openai.OpenAI(base_url=market.base + "/v1", api_key=key, max_retries=0, timeout=60)
    assert any(m.id == "tiny" for m in c.models.list().data)
    whole = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                      max_tokens=12, temperature=0)
    assert whole.usage.completion_tokens >= 1
    streamed = [ch for ch in c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True})]
    text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
    assert text == whole.choices[0].message.content
    assert streamed[-1].usage.completion_tokens == whole.usage.completion_tokens
    comp = c.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0)
    assert comp.usage.completion_tokens == 5
    spent = sum(x.usage.model_extra["cost_nano_usd"] for x in (whole, streamed[-1], comp))
    assert settled_balance(market.base, key) == 10**9 - spent
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_two_api_replicas_relay_tokens_through_redis(tmp_path, pg_url):
    """The node holds its channel on replica A; the buyer talks to replica B."""
    from tests.e2e.market import free_port

    m = Market(home=tmp_path, env=production_env(tmp_path, pg_url, BROKERS["redis"][0]))
    try:
        m.agora("migrate")
        m.start_coordinator()  # replica A: the node connects here
        m.start_worker()
        m.start_node("node-r")
        m.wait_live("tiny", 1)
        port_b = free_port()
        m.spawn("coordinator-b", "serve", "--port", str(port_b), "--no-migrate")
        base_b = f"http://127.0.0.1:{port_b}"
        m.wait(lambda: httpx.get(base_b + "/healthz", timeout=1).status_code == 200, "replica B")
        key = m.agora("account", "create", "--credit", str(10**9))
        c = openai.OpenAI(base_url=base_b + "/v1", api_key=key, max_retries=0, timeout=60)
        chunks = list(c.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 8
        assert sum(1 for ch in chunks if ch.choices and ch.choices[0].text) >= 2
    finally:
        m.stop()


def test_parallel_requests_never_overdraw_a_small_balance(market):
    """20 concurrent requests against a balance that covers only a few worst-case holds:
    the rest get 402, nobody is overdrawn, and the balance is exactly credit - charges."""
    from concurrent.futures import ThreadPoolExecutor

    hold = (40 + 8 + 8) * 50_000_000 // 10**6 + 8 * 300_000_000 // 10**6  # bytes+allowance, max_tokens 8
    credit = 3 * hold + hold // 2
    key = market.agora("account", "create", "--credit", str(credit))
    c = openai.OpenAI(base_url=market.base + "/v1", api_key=key, max_retries=0, timeout=60)

    def one(i: int):
        try:
            r = c.chat.completions.create(model="tiny", max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": f"{i:040d}"}])
            return r.usage.model_extra["cost_nano_usd"]
        except openai.APIStatusError as exc:
            return exc.status_code

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(one, range(20)))
    costs = [r for r in results if r not in (402,)]
    assert results.count(402) >= 1 and 1 <= len(costs) <= 20
    assert settled_balance(market.base, key) == credit - sum(costs) >= 0


def test_worker_killed_between_hold_and_settlement_loses_and_doubles_nothing(tmp_path, pg_url):
    """The only scheduler worker dies (SIGKILL) while a stream is in flight; a new worker
    takes over; the stream's settlement happens exactly once; keyed replays are free."""
    m = Market(home=tmp_path, env=production_env(tmp_path, pg_url, BROKERS["redis"][0]))
    try:
        m.agora("migrate")
        m.start_coordinator()
        worker = m.spawn("worker-1", "worker", "--concurrency", "2")
        m.start_node("node-k", extra=("--max-tokens-per-s", "20"))
        m.wait_live("tiny", 1)
        key = m.agora("account", "create", "--credit", str(10**9))
        auth = {"Authorization": f"Bearer {key}"}
        c = openai.OpenAI(base_url=m.base + "/v1", api_key=key, max_retries=0, timeout=90)
        stream = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=30, temperature=0, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_headers={"Idempotency-Key": "k-1"})
        chunks = []
        for i, ch in enumerate(stream):
            chunks.append(ch)
            if i == 3:  # tokens are flowing: the worker that dispatched it dies now
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
                m.procs.remove(worker)
                m.spawn("worker-2", "worker", "--beat", "--concurrency", "2")
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 30
        cost = usage.model_extra["cost_nano_usd"]
        replay = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=30, temperature=0, extra_headers={"Idempotency-Key": "k-1"})
        assert replay.usage.model_extra["cost_nano_usd"] == cost
        bal = settled_balance(m.base, key)  # settled in the background, at the reported cost
        assert bal == 10**9 - cost
        entries = httpx.get(m.base + "/v1/account/statement", headers=auth).json()["entries"]
        assert [e["kind"] for e in entries].count("hold") == 1
    finally:
        m.stop()
