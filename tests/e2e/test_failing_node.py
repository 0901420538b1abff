"""A node whose engine fails every request leaves the market fast, and its buyers never
notice: the cheapest node sells through an OpenAI-compatible upstream that then goes down
(every request an engine error). Each failure fails over to the healthy node, the failing
node backs off, and after at most 3 failures it is out of routing and told why in its log.
Real processes: the coordinator, two `agora node` agents and the upstream server."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.e2e.market import embedded_market, free_port, settled_balance
from tests.node_agent.upstreams import SCRIPT

pytestmark = pytest.mark.slow


def _upstream(tmp_path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--port", str(port), "--mode", "ids", "--model", "tiny"],
                            stdout=(tmp_path / "upstream.log").open("w"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "upstream did not start"
        time.sleep(0.05)


def test_a_node_whose_engine_fails_every_request_is_out_after_three_and_buyers_are_served(tmp_path):
    upstream, url = _upstream(tmp_path)
    try:
        with embedded_market(tmp_path, AGORA_CANARY_INTERVAL_S="0") as m:
            bad_id = m.agora("node", "keygen", "--key", str(m.home / "bad.pem"))
            m.start_node("bad", price_in="0.01", price_out="0.02",
                         extra=("--engine", "openai", "--upstream", url, "--no-bench", "--tokens-per-s", "500"))
            m.start_node("good", price_in="0.10", price_out="0.20")
            m.wait_live("tiny", 2)
            upstream.kill()  # the cheapest node's engine now fails every request
            upstream.wait()
            key = m.agora("account", "create", "--credit", str(10**9))
            c = openai.OpenAI(base_url=m.base + "/v1", api_key=key, timeout=60)  # default retries on
            served = []
            deadline = time.monotonic() + 40  # backoff 2 s, then 4 s, then out: well within this
            while True:
                r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                              max_tokens=8, temperature=0, extra_body={"routing": {"sort": "price"}})
                assert r.usage.completion_tokens == 8 and r.choices[0].message.content is not None
                served.append(r.system_fingerprint)
                nodes = {n["id"]: n for n in httpx.get(m.base + "/v1/nodes").json()}
                bad = nodes[bad_id]
                if bad["excluded_reason"] or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert not bad["routable"] and "failed jobs in a row" in bad["not_routable_because"]
            assert bad["failures"] <= 3 and bad["jobs"] == 0
            assert all(fp == f"agora-node-{nodes[[k for k in nodes if k != bad_id][0]]['id'][:12]}" for fp in served)
            models = httpx.get(m.base + "/v1/models").json()["data"]
            assert models[0]["live_nodes"] == 1  # only the healthy node counts
            log = (m.home / "bad.log").read_text()
            assert "coordinator: out of routing after" in log  # the seller is told why
            assert settled_balance(m.base, key) < 10**9  # served and paid, once each
    finally:
        if upstream.poll() is None:
            upstream.kill()
