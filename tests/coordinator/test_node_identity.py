"""Node identity: only the holder of a node's key can register, heartbeat or open its
channel, and a captured message cannot be replayed or delayed past the window."""

from __future__ import annotations

import time

from node_agent.identity import Identity
from protocol import Heartbeat, ModelOffer, Registration, fresh_stamp


def registration(identity: Identity, **over) -> Registration:
    fields = dict(node_id=identity.public_key_hex, **fresh_stamp(),
                  models=[ModelOffer(model="tiny", price_in=100, price_out=200, tokens_per_s=50.0)],
                  region="us-east", max_concurrency=4)
    fields.update(over)
    return Registration(**fields)


def post(client, path, msg):
    return client.post(path, json=msg.model_dump(mode="json"))


def test_register_and_heartbeat_with_valid_signatures(client):
    me = Identity.generate()
    r = post(client, "/v1/nodes/register", registration(me).sign(me))
    assert r.status_code == 200, r.text
    assert r.json()["node_id"] == me.public_key_hex
    hb = Heartbeat(node_id=me.public_key_hex, **fresh_stamp()).sign(me)
    assert post(client, "/v1/nodes/heartbeat", hb).status_code == 200
    nodes = client.get("/v1/nodes").json()
    assert [n["id"] for n in nodes] == [me.public_key_hex]
    assert nodes[0]["offers"][0]["price_out"] == 200


def test_forged_signature_is_refused(client):
    victim, attacker = Identity.generate(), Identity.generate()
    forged = registration(victim).sign(attacker)  # claims the victim's id, signed by another key
    r = post(client, "/v1/nodes/register", forged)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "bad_signature"
    assert client.get("/v1/nodes").json() == []


def test_tampered_message_is_refused(client):
    me = Identity.generate()
    reg = registration(me).sign(me)
    reg.models[0].price_out = 1  # changed after signing
    assert post(client, "/v1/nodes/register", reg).status_code == 401


def test_stale_timestamp_is_refused(client):
    me = Identity.generate()
    old = registration(me, timestamp=time.time() - 3600).sign(me)
    r = post(client, "/v1/nodes/register", old)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "stale_timestamp"
    future = registration(me, timestamp=time.time() + 3600).sign(me)
    assert post(client, "/v1/nodes/register", future).json()["error"]["code"] == "stale_timestamp"


def test_replayed_nonce_is_refused(client):
    me = Identity.generate()
    assert post(client, "/v1/nodes/register", registration(me).sign(me)).status_code == 200
    hb = Heartbeat(node_id=me.public_key_hex, **fresh_stamp()).sign(me)
    assert post(client, "/v1/nodes/heartbeat", hb).status_code == 200
    again = post(client, "/v1/nodes/heartbeat", hb)  # the same signed message, captured and resent
    assert again.status_code == 401
    assert again.json()["error"]["code"] == "replayed_nonce"


def test_cannot_heartbeat_as_another_node(client):
    a, b = Identity.generate(), Identity.generate()
    for who in (a, b):
        assert post(client, "/v1/nodes/register", registration(who).sign(who)).status_code == 200
    spoof = Heartbeat(node_id=a.public_key_hex, **fresh_stamp()).sign(b)
    r = post(client, "/v1/nodes/heartbeat", spoof)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "bad_signature"


def test_unknown_node_heartbeat_is_404(client):
    me = Identity.generate()
    hb = Heartbeat(node_id=me.public_key_hex, **fresh_stamp()).sign(me)
    assert post(client, "/v1/nodes/heartbeat", hb).status_code == 404


def test_channel_refuses_a_forged_hello(client):
    from protocol import ChannelHello

    a, b = Identity.generate(), Identity.generate()
    assert post(client, "/v1/nodes/register", registration(a).sign(a)).status_code == 200
    with client.websocket_connect("/v1/nodes/channel") as ws:
        ws.send_json(ChannelHello(node_id=a.public_key_hex, **fresh_stamp()).sign(b).model_dump(mode="json"))
        reply = ws.receive_json()
    assert reply["type"] == "refused"
    with client.websocket_connect("/v1/nodes/channel") as ws:
        ws.send_json(ChannelHello(node_id=a.public_key_hex, **fresh_stamp()).sign(a).model_dump(mode="json"))
        assert ws.receive_json() == {"type": "welcome", "node_id": a.public_key_hex}


def test_silent_nodes_go_offline(runtime, client):
    from datetime import timedelta

    from coordinator.models import Node
    from coordinator.models.account import utcnow
    from coordinator.node_registry import mark_silent_offline

    me = Identity.generate()
    assert post(client, "/v1/nodes/register", registration(me).sign(me)).status_code == 200
    with runtime.session() as s:
        assert mark_silent_offline(s, runtime.settings) == []
        later = utcnow() + timedelta(seconds=runtime.settings.heartbeat_timeout_s + 1)
        assert mark_silent_offline(s, runtime.settings, now=later) == [me.public_key_hex]
    with runtime.session() as s:
        assert s.get(Node, me.public_key_hex).online is False
