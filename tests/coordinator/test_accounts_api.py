"""Operator routes need the admin token; deposits are idempotent; keys are stored hashed."""

from __future__ import annotations

from sqlmodel import select

from coordinator.models import ApiKey

ADMIN = {"Authorization": "Bearer admin-secret"}


def test_admin_routes_refuse_buyers_and_strangers(client):
    r = client.post("/admin/accounts", json={"name": "x"})
    assert r.status_code == 401
    made = client.post("/admin/accounts", json={"name": "x"}, headers=ADMIN).json()
    as_buyer = {"Authorization": f"Bearer {made['api_key']}"}
    assert client.post("/admin/accounts", json={"name": "y"}, headers=as_buyer).status_code == 403
    assert client.post(f"/admin/accounts/{made['id']}/deposits", headers=as_buyer,
                       json={"amount_nano_usd": 5, "idempotency_key": "k"}).status_code == 403


def test_deposit_is_idempotent_and_conflicting_reuse_is_409(client):
    made = client.post("/admin/accounts", json={"name": "b", "credit_nano_usd": 100}, headers=ADMIN).json()
    url = f"/admin/accounts/{made['id']}/deposits"
    first = client.post(url, json={"amount_nano_usd": 50, "idempotency_key": "topup-1"}, headers=ADMIN)
    replay = client.post(url, json={"amount_nano_usd": 50, "idempotency_key": "topup-1"}, headers=ADMIN)
    assert first.json()["balance_nano_usd"] == replay.json()["balance_nano_usd"] == 150
    clash = client.post(url, json={"amount_nano_usd": 70, "idempotency_key": "topup-1"}, headers=ADMIN)
    assert clash.status_code == 409
    me = client.get("/v1/account", headers={"Authorization": f"Bearer {made['api_key']}"}).json()
    assert me["balance_nano_usd"] == 150
    for bad in ({"amount_nano_usd": -5, "idempotency_key": "x"}, {"amount_nano_usd": 5}, {}):
        assert client.post(url, json=bad, headers=ADMIN).status_code == 400
    assert client.post("/admin/accounts/acct_nope/deposits", headers=ADMIN,
                       json={"amount_nano_usd": 5, "idempotency_key": "z"}).status_code == 404


def test_api_keys_are_stored_hashed(client, runtime):
    made = client.post("/admin/accounts", json={"name": "h"}, headers=ADMIN).json()
    with runtime.session() as s:
        rows = s.exec(select(ApiKey)).all()
    assert rows and all(made["api_key"] not in (r.key_hash, r.prefix) for r in rows)
    assert client.get("/v1/account", headers={"Authorization": "Bearer " + made["api_key"] + "x"}).status_code == 401
