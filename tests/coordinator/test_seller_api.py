"""Sellers see and move their money with their node key: earnings, statement, payouts,
stake. A forged or replayed signature moves nothing. Buyers page their statement."""

from __future__ import annotations

from node_agent.identity import Identity
from protocol import AccountQuery, PayoutRequest, UnbondRequest, fresh_stamp
from tests.coordinator.test_node_identity import post, registration
from tests.coordinator.test_settlement import _node, _receipt, _request
from coordinator.settlement import Relayed, settle
from protocol import commitment_of

ADMIN = {"Authorization": "Bearer admin-secret"}


def _earn(runtime, node: Identity) -> tuple[str, int]:
    rid, buyer = _request(runtime, node)
    ids, lps = [5, 6, 7, 8], [-1, -2, -3, -4]
    with runtime.session() as s:
        result = settle(s, _receipt(node, rid, ids, lps), node.public_key_hex,
                        Relayed(4, commitment_of(rid, ids, lps)), runtime.settings)
    return rid, result.cost


def test_seller_sees_earnings_and_statement_then_is_paid_out_once(client, runtime):
    runtime.settings.challenge_window_s = 0
    node = _node(runtime)
    rid, cost = _earn(runtime, node)
    me = post(client, "/v1/nodes/me/account", AccountQuery(node_id=node.public_key_hex, **fresh_stamp()).sign(node))
    assert me.status_code == 200, me.text
    body = me.json()
    net = cost - cost * runtime.settings.platform_fee_bps // 10_000
    assert body["earnings_nano_usd"] == net
    assert [(e["kind"], e["amount"], e["request_ref"]) for e in body["statement"]] == [("earning", net, rid)]
    pay = PayoutRequest(node_id=node.public_key_hex, **fresh_stamp(), amount=net - 1, idempotency_key="p1")
    assert post(client, "/v1/nodes/me/payouts", pay.sign(node)).json()["earnings_nano_usd"] == 1
    replay = PayoutRequest(node_id=node.public_key_hex, **fresh_stamp(), amount=net - 1, idempotency_key="p1")
    assert post(client, "/v1/nodes/me/payouts", replay.sign(node)).json()["earnings_nano_usd"] == 1
    too_much = PayoutRequest(node_id=node.public_key_hex, **fresh_stamp(), amount=2, idempotency_key="p2")
    assert post(client, "/v1/nodes/me/payouts", too_much.sign(node)).status_code == 402


def test_forged_or_replayed_payouts_move_nothing(client, runtime):
    runtime.settings.challenge_window_s = 0
    node, thief = _node(runtime), Identity.generate()
    _, cost = _earn(runtime, node)
    forged = PayoutRequest(node_id=node.public_key_hex, **fresh_stamp(), amount=1, idempotency_key="x").sign(thief)
    assert post(client, "/v1/nodes/me/payouts", forged).status_code == 401
    honest = PayoutRequest(node_id=node.public_key_hex, **fresh_stamp(), amount=1, idempotency_key="y").sign(node)
    assert post(client, "/v1/nodes/me/payouts", honest).status_code == 200
    assert post(client, "/v1/nodes/me/payouts", honest).status_code == 401  # the captured request, resent
    q = AccountQuery(node_id=node.public_key_hex, **fresh_stamp()).sign(node)
    net = cost - cost * runtime.settings.platform_fee_bps // 10_000
    assert post(client, "/v1/nodes/me/account", q).json()["earnings_nano_usd"] == net - 1


def test_minimum_stake_gates_registration_and_unbonding_keeps_it_bonded_until_matured(client, runtime):
    runtime.settings.min_stake_nano_usd = 1_000
    me = Identity.generate()
    r = post(client, "/v1/nodes/register", registration(me).sign(me))
    assert r.status_code == 402 and r.json()["error"]["code"] == "stake_below_minimum"
    url = f"/admin/nodes/{me.public_key_hex}/stake"
    assert client.post(url, json={"amount_nano_usd": 1_500, "idempotency_key": "s1"}, headers=ADMIN).status_code == 200
    assert client.post(url, json={"amount_nano_usd": 1_500, "idempotency_key": "s1"},
                       headers=ADMIN).json()["stake_nano_usd"] == 1_500  # replay
    assert post(client, "/v1/nodes/register", registration(me).sign(me)).status_code == 200
    unbond = UnbondRequest(node_id=me.public_key_hex, **fresh_stamp(), amount=600, idempotency_key="u1").sign(me)
    assert post(client, "/v1/nodes/me/unbond", unbond).status_code == 200
    acct = post(client, "/v1/nodes/me/account", AccountQuery(node_id=me.public_key_hex, **fresh_stamp()).sign(me)).json()
    assert (acct["stake_bonded_nano_usd"], acct["stake_unbonding_nano_usd"]) == (900, 600)
    over = UnbondRequest(node_id=me.public_key_hex, **fresh_stamp(), amount=1_000, idempotency_key="u2").sign(me)
    assert post(client, "/v1/nodes/me/unbond", over).status_code == 402
    assert post(client, "/v1/nodes/register", registration(me).sign(me)).status_code == 402  # 900 < 1000


def test_buyer_statement_shows_hold_and_release_with_request_ids(client, runtime):
    made = client.post("/admin/accounts", json={"name": "b", "credit_nano_usd": 10**9}, headers=ADMIN).json()
    auth = {"Authorization": f"Bearer {made['api_key']}"}
    node = _node(runtime)
    from coordinator.admission import admit
    from coordinator.models import Account
    from coordinator.schemas import ChatCompletionRequest
    from coordinator.settlement import fail_request

    with runtime.session() as s:
        acct = s.get(Account, made["id"])
        rid = admit(s, acct, ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                   max_tokens=10), "chat", runtime.settings).request.id
    with runtime.session() as s:
        fail_request(s, rid, "timed out")
    page = client.get("/v1/account/statement?limit=2", headers=auth).json()
    kinds = [(e["kind"], e["request_ref"]) for e in page["entries"]]
    assert kinds == [("void", rid), ("hold", rid)]
    assert page["entries"][0]["amount"] == -page["entries"][1]["amount"] > 0
    assert page["balance_nano_usd"] == 10**9
    older = client.get(f"/v1/account/statement?limit=2&before={page['next_cursor']}", headers=auth).json()
    assert [e["kind"] for e in older["entries"]] == ["deposit"] and older["next_cursor"] is None
    assert client.get("/v1/account/statement?limit=0", headers=auth).status_code == 400
    _ = node


def test_unbonded_stake_is_paid_out_by_the_sweep_after_the_delay(client, runtime):
    from datetime import timedelta

    from coordinator.models.account import utcnow
    from pricing.ledger import AccountKind, Ledger
    from pricing.ledger_models import LedgerUnbonding
    from scheduler import tasks
    from sqlalchemy import update

    me = Identity.generate()
    url = f"/admin/nodes/{me.public_key_hex}/stake"
    client.post(url, json={"amount_nano_usd": 1_000, "idempotency_key": "s"}, headers=ADMIN)
    assert post(client, "/v1/nodes/register", registration(me).sign(me)).status_code == 200
    unbond = UnbondRequest(node_id=me.public_key_hex, **fresh_stamp(), amount=400, idempotency_key="u").sign(me)
    assert post(client, "/v1/nodes/me/unbond", unbond).status_code == 200
    assert tasks.sweep.apply().get()["unbonded"] == 0  # not matured yet
    with runtime.session() as s:
        s.exec(update(LedgerUnbonding).values(matures_at=utcnow() - timedelta(seconds=1)))
    assert tasks.sweep.apply().get()["unbonded"] == 1
    with runtime.session() as s:
        led = Ledger(s)
        assert led.balance(led.open_account(AccountKind.SELLER_STAKE, ref=f"node:{me.public_key_hex}").id) == 600


def test_fresh_earnings_wait_out_the_challenge_window(client, runtime):
    runtime.settings.challenge_window_s = 3600
    node = _node(runtime)
    _, cost = _earn(runtime, node)
    me = post(client, "/v1/nodes/me/account", AccountQuery(node_id=node.public_key_hex, **fresh_stamp()).sign(node))
    assert me.json()["earnings_nano_usd"] > 0 and me.json()["available_for_payout_nano_usd"] == 0
    pay = PayoutRequest(node_id=node.public_key_hex, **fresh_stamp(), amount=1, idempotency_key="early").sign(node)
    r = post(client, "/v1/nodes/me/payouts", pay)
    assert r.status_code == 402 and "claw" in r.json()["error"]["message"]
    runtime.settings.challenge_window_s = 0  # the window has passed
    pay = PayoutRequest(node_id=node.public_key_hex, **fresh_stamp(), amount=1, idempotency_key="later").sign(node)
    assert post(client, "/v1/nodes/me/payouts", pay).status_code == 200
