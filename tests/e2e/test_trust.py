"""Trust with real node agent processes: a seller that over-bills prompt tokens fails its
audits (the verifier counts the prompt again); a seller that serves honestly, then restarts
with the same key on a tampered checkpoint is caught by the check its reconnect triggers."""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import openai
import pytest

from tests.e2e.market import embedded_market, settled_balance

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": "Bearer admin-e2e"}


def _audits(m, node_id: str) -> list[dict]:
    return httpx.get(f"{m.base}/admin/audits", params={"node_id": node_id}, headers=ADMIN).json()


def _settled_audits(m, node_id: str, timeout: float = 40) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        audits = _audits(m, node_id)
        if audits and not any(a["status"] in ("pending", "sent") for a in audits) or time.monotonic() > deadline:
            return audits
        time.sleep(0.5)


def _trusted_verifier(m) -> str:
    vid = m.agora("node", "keygen", "--key", str(m.home / "ops.pem"))
    m.start_node("ops", price_in="0.10", price_out="0.20", extra=("--operator", "operator"))
    return vid


def _cheater_and_ops(m, name: str, adversary: str) -> tuple[str, str]:
    """A cheating seller (the cheapest) and the operator's trusted verifier, both live."""
    cheat = m.agora("node", "keygen", "--key", str(m.home / f"{name}.pem"))
    m.start_node(name, price_in="0.01", price_out="0.02", extra=("--operator", name, "--adversary", adversary))
    ops = _trusted_verifier(m)
    m.wait_live("tiny", 2)
    assert httpx.post(f"{m.base}/admin/nodes/{ops}/trust", headers=ADMIN).status_code == 200
    return cheat, ops


def test_prompt_overbilling_is_caught_by_the_verifiers_own_count(tmp_path):
    with embedded_market(tmp_path, AGORA_ADMIN_TOKEN="admin-e2e", AGORA_CANARY_INTERVAL_S="0") as m:
        liar, _ = _cheater_and_ops(m, "liar", "overbill_prompt")
        key = m.agora("account", "create", "--credit", str(10**9))
        c = openai.OpenAI(base_url=m.base + "/v1", api_key=key, max_retries=0, timeout=60)
        for i in range(3):
            c.completions.create(model="tiny", prompt=f"a prompt of some length, number {i}", max_tokens=8,
                                 temperature=0, extra_body={"routing": {"sort": "price"}})
        audits = _settled_audits(m, liar)
        failed = [a for a in audits if a["status"] == "failed"]
        assert failed and all("prompt_overbilled" in a["verdict"]["reasons"] for a in failed), audits
        assert all(a["consequences"]["buyer_made_whole"] for a in failed), json.dumps([a["consequences"] for a in failed])
        assert settled_balance(m.base, key) <= 10**9


def test_a_checkpoint_swapped_after_honest_work_is_caught_on_reconnect(tmp_path):
    with embedded_market(tmp_path, AGORA_ADMIN_TOKEN="admin-e2e", AGORA_CANARY_INTERVAL_S="3600") as m:
        seller = m.agora("node", "keygen", "--key", str(m.home / "seller.pem"))
        honest = m.start_node("seller", price_in="0.01", price_out="0.02", extra=("--operator", "s"))
        ops = _trusted_verifier(m)
        m.wait_live("tiny", 2)
        assert httpx.post(f"{m.base}/admin/nodes/{ops}/trust", headers=ADMIN).status_code == 200
        key = m.agora("account", "create", "--credit", str(10**10))
        c = openai.OpenAI(base_url=m.base + "/v1", api_key=key, max_retries=0, timeout=60)
        for i in range(24):  # honest work: past the new-node window, audits passed
            c.completions.create(model="tiny", prompt=f"honest job {i}", max_tokens=8, temperature=0,
                                 extra_body={"routing": {"sort": "price"}})
        before = _settled_audits(m, seller)
        assert before and all(a["status"] == "passed" for a in before), before
        # the same key, restarted on int4 weights
        os.killpg(honest.pid, signal.SIGTERM)
        honest.wait(15)
        m.procs.remove(honest)
        m.spawn("seller-swapped", "node", "--coordinator", m.base, "--model", "tiny", "--price-in", "0.01",
                "--price-out", "0.02", "--region", "us-east", "--key", str(m.home / "seller.pem"),
                "--torch-threads", "1", "--max-concurrency", "4", "--operator", "s", "--adversary", "int4")
        deadline = time.monotonic() + 90
        caught = []
        while time.monotonic() < deadline and not caught:
            caught = [a for a in _audits(m, seller) if a["status"] == "failed"]
            time.sleep(0.5)
        assert caught, _audits(m, seller)
        sold_before_caught = [a for a in _audits(m, seller) if a["id"] > max(b["id"] for b in before)]
        assert len(sold_before_caught) <= 20


def test_a_node_that_cheats_then_stalls_has_its_segment_audited_and_the_buyer_pays_only_the_honest_part(tmp_path):
    """The stalled node's part of the stream is paid at failover, so it is audited like any
    job: the cheated segment fails its audit and the buyer ends up paying only for the
    tokens the honest node made."""
    from pricing.money import request_cost

    with embedded_market(tmp_path, AGORA_ADMIN_TOKEN="admin-e2e", AGORA_CANARY_INTERVAL_S="0",
                         AGORA_TOKEN_TIMEOUT_S="2") as m:
        staller, ops = _cheater_and_ops(m, "staller", "cheat_then_stall")
        credit = 10**9
        key = m.agora("account", "create", "--credit", str(credit))
        c = openai.OpenAI(base_url=m.base + "/v1", api_key=key, timeout=60)  # default retries, as buyers run it
        stream = c.completions.create(model="tiny", prompt="a story about a market", max_tokens=16, temperature=0,
                                      stream=True, stream_options={"include_usage": True},
                                      extra_body={"routing": {"sort": "price"}})
        chunks = list(stream)
        rid = chunks[0].id
        assert chunks[-1].usage.completion_tokens == 16  # one stream, across the failover
        auth = {"Authorization": f"Bearer {key}"}
        view = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and view.get("status") != "completed":
            view = httpx.get(f"{m.base}/v1/requests/{rid}", headers=auth).json()
            time.sleep(0.3)
        assert view["status"] == "completed" and view["node_id"] == ops, view
        [seg] = view["segments"]
        assert seg["node_id"] == staller and 0 < seg["tokens"] < 16, view
        audits = _settled_audits(m, staller)
        [bad] = [a for a in audits if a["request_id"] == rid]
        assert bad["status"] == "failed" and bad["segment"] == 0, bad
        assert bad["consequences"]["buyer_made_whole"], bad["consequences"]
        honest_part = request_cost(0, 16 - seg["tokens"], view["price_in"], view["price_out"])
        deadline = time.monotonic() + 20
        while settled_balance(m.base, key) != credit - honest_part and time.monotonic() < deadline:
            time.sleep(0.3)
        assert settled_balance(m.base, key) == credit - honest_part
