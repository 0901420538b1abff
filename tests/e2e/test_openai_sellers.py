"""OpenAI-compatible servers as sellers, end to end with real processes: `agora serve`
(embedded), three `bench/upstream.py` servers (vLLM style with ids and log-probs, token
strings only, text only), one `agora node --engine openai` seller per upstream, and an
operator's `agora verifier` (marked trusted by the operator) rescoring through an
upstream's `echo`. Buyers use the official `openai` client.

- The seller with ids and log-probs is an ordinary, audited node: its audits pass.
- The others cannot be audited: they get work only where the operator allows unverified
  nodes and the buyer asks for them, and then answer exactly what the same model answers
  elsewhere, with the same token counts (the server's own count)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.e2e.market import embedded_market, settled_balance
from tests.node_agent.upstreams import upstreams

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": "Bearer admin-e2e"}
OPT_IN = {"routing": {"sort": "price", "allow_unverified": True}}
PROMPTS = [f"The story number {i} begins" for i in range(6)]


def _node_id(m, name: str) -> str:
    return m.agora("node", "keygen", "--key", str(m.home / f"{name}.pem"))


def _models(m) -> dict[str, dict]:
    return {d["id"]: d for d in httpx.get(m.base + "/v1/models", timeout=5).json()["data"]}


def _served_by(m, key: str, request_id: str) -> str:
    return httpx.get(f"{m.base}/v1/requests/{request_id}", headers={"Authorization": f"Bearer {key}"},
                     timeout=5).json()["node_id"]


def test_openai_compatible_sellers(tmp_path):
    with upstreams("ids", "tokens", "text", log_dir=tmp_path) as ups, \
            embedded_market(tmp_path, AGORA_ADMIN_TOKEN="admin-e2e", AGORA_ALLOW_UNVERIFIED_NODES="true") as m:
        ids = {n: _node_id(m, n) for n in ("ids", "tokens", "text", "verifier")}
        seller = ("--engine", "openai", "--no-bench", "--tokens-per-s", "100")
        m.start_node("ids", price_in="0.10", price_out="0.20",
                     extra=(*seller, "--upstream", ups["ids"], "--operator", "alice"))
        m.start_node("tokens", price_in="0.05", price_out="0.10",
                     extra=(*seller, "--upstream", ups["tokens"], "--served-name", "tiny-tokens", "--operator", "carol"))
        m.start_node("text", price_in="0.01", price_out="0.02",  # the cheapest: only opt-in buyers reach it
                     extra=(*seller, "--upstream", ups["text"], "--operator", "dave"))
        m.spawn("verifier", "verifier", "--coordinator", m.base, "--model", "tiny", "--engine", "openai",
                "--upstream", ups["ids"], "--operator", "bob", "--key", str(m.home / "verifier.pem"))

        def listed():
            ms = _models(m)
            return (ms["tiny"]["live_nodes"], ms["tiny"]["unverified_nodes"], ms["tiny-tokens"]["unverified_nodes"],
                    ms["tiny-tokens"]["live_nodes"]) == (1, 1, 1, 0)

        m.wait(listed, "the three sellers listed (one verifiable, two unverified)", 120)
        # The operator trusts its own verifier (verdicts need no second opinion, no audits of its own first).
        m.wait(lambda: httpx.post(f"{m.base}/admin/nodes/{ids['verifier']}/trust", headers=ADMIN,
                                  timeout=5).status_code == 200, "the verifier registered")
        key = m.agora("account", "create", "--credit", str(10**10))
        c = openai.OpenAI(base_url=m.base + "/v1", api_key=key, max_retries=0, timeout=60)

        # 1. Without the buyer's opt-in, only the auditable seller serves (the cheaper text-only one never).
        answers = {}
        for p in PROMPTS:
            r = c.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0,
                                     extra_body={"routing": {"sort": "price"}})
            assert _served_by(m, key, r.id) == ids["ids"]
            answers[p] = (r.choices[0].text, r.usage.completion_tokens)
        with pytest.raises(openai.APIStatusError):
            c.completions.create(model="tiny-tokens", prompt="hello", max_tokens=4, temperature=0)

        # 2. With the operator's and the buyer's opt-in: the unverifiable sellers serve the same
        #    answers with the same token counts (whole and streamed).
        for p in PROMPTS[:3]:
            r = c.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0, extra_body=OPT_IN)
            assert _served_by(m, key, r.id) == ids["text"]
            assert (r.choices[0].text, r.usage.completion_tokens) == answers[p]
            t = c.completions.create(model="tiny-tokens", prompt=p, max_tokens=24, temperature=0, extra_body=OPT_IN)
            assert _served_by(m, key, t.id) == ids["tokens"]
            assert (t.choices[0].text, t.usage.completion_tokens) == answers[p]
        p = PROMPTS[3]
        stream = c.completions.create(model="tiny", prompt=p, max_tokens=24, temperature=0, stream=True,
                                      stream_options={"include_usage": True}, extra_body=OPT_IN)
        text, usage = "", None
        for chunk in stream:
            text += "".join(ch.text for ch in chunk.choices)
            usage = chunk.usage or usage
        assert (text, usage.completion_tokens) == answers[p]
        chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                         temperature=0, extra_body=OPT_IN)
        assert chat.choices[0].message.content and chat.usage.completion_tokens >= 1

        # 3. The auditable seller's audits go to the operator's verifier (another operator, rescoring
        #    through its upstream's echo) and pass.
        deadline, audits = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            audits = httpx.get(f"{m.base}/admin/audits", params={"node_id": ids["ids"]}, headers=ADMIN).json()
            if len(audits) >= 3 and not any(a["status"] in ("pending", "sent") for a in audits):
                break
            time.sleep(0.5)
        assert len(audits) >= 3 and all(a["status"] == "passed" for a in audits), audits
        assert {a["verifier_id"] for a in audits} == {ids["verifier"]}

        # Nothing of the unverifiable sellers' work is audited; the books close.
        for name in ("tokens", "text"):
            assert httpx.get(f"{m.base}/admin/audits", params={"node_id": ids[name]}, headers=ADMIN).json() == []
        assert settled_balance(m.base, key) < 10**10
