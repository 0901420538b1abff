"""Scale-out, exercised: two API replicas and two scheduler workers on PostgreSQL + Redis.
A buyer on replica A is served by a node whose work channel is on replica B (tokens cross
replicas on the Redis relay), and the other way round; money settles once, and each
replica reports itself ready."""

from __future__ import annotations

import os
import uuid

import httpx
import openai
import pytest

from tests.e2e.market import Market, free_port, settled_balance

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


def test_a_buyer_on_one_replica_is_served_by_a_node_on_the_other(tmp_path, pg_url, redis_url):
    tag = uuid.uuid4().hex[:8]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AGORA_")},
           "AGORA_HOME": str(tmp_path), "AGORA_DATABASE_URL": pg_url, "AGORA_BROKER_URL": redis_url,
           "AGORA_REDIS_URL": redis_url, "AGORA_CELERY_QUEUE": f"agora-scale-{tag}",
           "AGORA_REDIS_PREFIX": f"agora-scale-{tag}:", "AGORA_NODE_HEARTBEAT_INTERVAL_S": "1",
           "AGORA_MIN_STAKE_NANO_USD": "0", "AGORA_CANARY_INTERVAL_S": "0"}
    m = Market(home=tmp_path, env=env)
    port_b = free_port()
    base_b = f"http://127.0.0.1:{port_b}"
    try:
        m.agora("migrate")
        m.spawn("api-a", "serve", "--port", str(m.port), "--no-migrate")
        m.spawn("api-b", "serve", "--port", str(port_b), "--no-migrate")
        for base in (m.base, base_b):
            m.wait(lambda base=base: httpx.get(base + "/readyz", timeout=1).status_code == 200, f"replica {base}")
        m.spawn("worker-1", "worker", "--beat", "--concurrency", "2")
        m.spawn("worker-2", "worker", "--concurrency", "2")
        on_b = m.agora("node", "keygen", "--key", str(tmp_path / "on-b.pem"))
        m.spawn("on-b", "node", "--coordinator", base_b, "--model", "tiny", "--price-in", "0.01", "--price-out",
                "0.02", "--region", "us-east", "--key", str(tmp_path / "on-b.pem"), "--torch-threads", "1")
        m.wait_live("tiny", 1)
        key = m.agora("account", "create", "--credit", str(10**9))
        a = openai.OpenAI(base_url=m.base + "/v1", api_key=key, max_retries=0, timeout=60)
        whole = a.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "across replicas"}],
                                          max_tokens=12, temperature=0)
        assert whole.usage.completion_tokens == 12 and whole.system_fingerprint == f"agora-node-{on_b[:12]}"
        streamed = [ch for ch in a.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "across replicas"}], max_tokens=12, temperature=0,
            stream=True, stream_options={"include_usage": True})]
        text = "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
        assert text == whole.choices[0].message.content and streamed[-1].usage.completion_tokens == 12
        # and the other way round: a node on A, a buyer on B
        on_a = m.agora("node", "keygen", "--key", str(tmp_path / "on-a.pem"))
        m.spawn("on-a", "node", "--coordinator", m.base, "--model", "tiny", "--price-in", "0.001", "--price-out",
                "0.002", "--region", "us-east", "--key", str(tmp_path / "on-a.pem"), "--torch-threads", "1")
        m.wait_live("tiny", 2)
        b = openai.OpenAI(base_url=base_b + "/v1", api_key=key, max_retries=0, timeout=60)
        other = b.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "back again"}],
                                          max_tokens=8, temperature=0, extra_body={"routing": {"sort": "price"}})
        assert other.system_fingerprint == f"agora-node-{on_a[:12]}"
        spent = sum(x.usage.model_extra["cost_nano_usd"] for x in (whole, streamed[-1], other))
        assert settled_balance(m.base, key) == settled_balance(base_b, key) == 10**9 - spent
    finally:
        m.stop()
