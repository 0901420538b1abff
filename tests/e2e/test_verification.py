"""Verification end to end with real node agent processes: a cheating node is audited by
another operator's node, caught, slashed, its buyer refunded in full, its reputation and
routing share cut, and banned after repeated failures; honest nodes pass their audits.
Dishonest receipts (inflated counts, replays) are refused and cost the buyer nothing."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.e2e.market import embedded_market, settled_balance

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": "Bearer admin-e2e"}
STAKE = 5_000_000_000


def _keyed_node(m, name: str) -> str:
    node_id = m.agora("node", "keygen", "--key", str(m.home / f"{name}.pem"))
    r = httpx.post(f"{m.base}/admin/nodes/{node_id}/stake", headers=ADMIN,
                   json={"amount_nano_usd": STAKE, "idempotency_key": f"stake-{name}"})
    assert r.status_code == 200, r.text
    return node_id


def _audits(m, node_id: str) -> list[dict]:
    return httpx.get(f"{m.base}/admin/audits", params={"node_id": node_id, "evidence": True}, headers=ADMIN).json()


@pytest.mark.parametrize("mode", ["other_model", "smaller_model", "int4", "random", "random_plausible",
                                  "random_oracle", "truncate"])
def test_cheating_node_is_caught_slashed_refunded_and_banned(tmp_path, mode):
    # canaries off: here the buyers' own jobs must catch the cheat (a canary on connect
    # would catch it before any buyer is served, tests/coordinator/test_canary.py)
    with embedded_market(tmp_path, AGORA_ADMIN_TOKEN="admin-e2e", AGORA_CANARY_INTERVAL_S="0") as m:
        ids = {name: _keyed_node(m, name) for name in ("cheat", "honest", "verifier")}
        m.start_node("cheat", price_in="0.01", price_out="0.02", extra=("--operator", "carol", "--adversary", mode))
        m.start_node("honest", price_in="0.10", price_out="0.20",
                     extra=("--operator", "alice", "--dtype", "bfloat16"))  # honest in bf16 passes too
        m.start_node("verifier", price_in="0.10", price_out="0.20", extra=("--operator", "bob"))
        m.wait_live("tiny", 3)
        # the operator's own verifier: its verdicts stand without a second opinion (a fresh
        # market has no node that has passed audits of its own yet)
        assert httpx.post(f"{m.base}/admin/nodes/{ids['verifier']}/trust", headers=ADMIN).status_code == 200
        key = m.agora("account", "create", "--credit", str(10**10))
        auth = {"Authorization": f"Bearer {key}"}
        c = openai.OpenAI(base_url=m.base + "/v1", api_key=key, max_retries=0, timeout=60)
        served = []
        for i in range(8):
            r = c.completions.create(model="tiny", prompt=f"The story number {i} begins", max_tokens=32,
                                     temperature=0, extra_body={"routing": {"sort": "price"}})
            served.append(httpx.get(f"{m.base}/v1/requests/{r.id}", headers=auth).json()["node_id"])
            time.sleep(0.3)  # let the audit of the last job land
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            audits = _audits(m, ids["cheat"])
            if audits and not any(a["status"] in ("pending", "sent") for a in audits):
                break
            time.sleep(0.5)
        failed = [a for a in audits if a["status"] == "failed"]
        assert len(failed) >= 1, audits  # caught on its first audited job or soon after
        assert all(a["verifier_id"] != ids["cheat"] for a in audits)
        assert all(a["consequences"]["buyer_made_whole"] for a in failed)
        assert failed[0]["evidence"]["claimed_logprobs"] and failed[0]["evidence"]["reference"]["logprob"]
        nodes = {n["id"]: n for n in httpx.get(m.base + "/v1/nodes").json()}
        cheat = nodes[ids["cheat"]]
        assert cheat["reputation"] <= 0.5 * 0.5 ** (len(failed) - 1) * 0.5 + 1e-9  # halved per failure
        assert cheat["banned"] == (len(failed) >= 3)  # banned after the third failure
        assert served[0] == ids["cheat"] and served[-1] != ids["cheat"]  # it lost its share
        # every job the cheat served was refunded: the buyer paid only for honest work
        bal = settled_balance(m.base, key)
        honest_cost = 0
        for rid in [e["request_ref"] for e in httpx.get(f"{m.base}/v1/account/statement?limit=500",
                                                          headers=auth).json()["entries"] if e["kind"] == "hold"]:
            req = httpx.get(f"{m.base}/v1/requests/{rid}", headers=auth).json()
            if req["node_id"] != ids["cheat"]:
                honest_cost += req["cost_nano_usd"] or 0
        assert bal == 10**10 - honest_cost
        for honest in ("honest", "verifier"):
            assert not any(a["status"] == "failed" for a in _audits(m, ids[honest]))
        econ = httpx.get(f"{m.base}/admin/nodes/{ids['honest']}/economics", headers=ADMIN).json()
        assert econ["deterrent"] is True and econ["ratio"] >= 3 and econ["audit_rate"] > 0


@pytest.mark.parametrize("mode", ["inflate_tokens", "replay_receipt"])
def test_dishonest_receipts_are_refused_and_free(tmp_path, mode):
    # no canary: its receipt would be the liar's first, the one a replay needs
    with embedded_market(tmp_path, AGORA_ADMIN_TOKEN="admin-e2e", AGORA_CANARY_INTERVAL_S="0") as m:
        m.start_node("liar", extra=("--adversary", mode))
        m.wait_live("tiny", 1)
        key = m.agora("account", "create", "--credit", str(10**9))
        c = openai.OpenAI(base_url=m.base + "/v1", api_key=key, max_retries=0, timeout=60)
        outcomes, costs = [], []
        for i in range(2):  # a replay needs a first receipt to replay
            try:
                r = c.completions.create(model="tiny", prompt=f"x{i}", max_tokens=6, temperature=0)
                outcomes.append("ok")
                costs.append(r.usage.model_extra["cost_nano_usd"])
            except openai.APIStatusError as exc:
                outcomes.append(exc.status_code)
        expected = {"inflate_tokens": [502, 502], "replay_receipt": ["ok", 502]}[mode]
        assert outcomes == expected
        assert settled_balance(m.base, key) == 10**9 - sum(costs)  # refused receipts cost nothing
