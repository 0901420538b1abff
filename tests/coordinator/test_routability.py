"""No value a node can send makes another buyer's request fail, and only nodes that can be
sold work are routed: the price ceiling, holds from the offers a buyer can afford, the
minimum stake, unverifiable engines by opt-in only, verify-only nodes, and a node's
newest work channel."""

from __future__ import annotations

import time

import pytest

from coordinator.account_service import create_account
from coordinator.admission import admit
from coordinator.errors import APIError
from coordinator.models import InferenceRequest, Node
from coordinator.routability import candidates, reasons
from coordinator.schemas import ChatCompletionRequest
from node_agent.identity import Identity
from pricing.ledger import AccountKind, Ledger
from pricing.money import request_cost
from pricing.stake import Stake
from protocol import ChannelHello, ModelOffer, UnbondRequest, fresh_stamp
from tests.coordinator.test_node_identity import post, registration

CEILING = 100 * 10**9  # the default: 100 USD per million tokens


def _seller(client, runtime, *, price_in=100_000_000, price_out=200_000_000, stake: int = 0,
            connected: bool = True, **over) -> Identity:
    me = Identity.generate()
    if stake:
        with runtime.session() as s:
            led = Ledger(s)
            acct = led.open_account(AccountKind.SELLER_STAKE, ref=f"node:{me.public_key_hex}").id
            Stake(led).deposit(acct, stake, idempotency_key=f"stake-{me.public_key_hex}")
    offer = ModelOffer(model="tiny", price_in=price_in, price_out=price_out, tokens_per_s=50.0,
                       **{k: over.pop(k) for k in ("token_ids", "logprobs", "can_verify", "quantization") if k in over})
    r = post(client, "/v1/nodes/register", registration(me, models=[offer], **over).sign(me))
    assert r.status_code == 200, r.text
    if connected:
        with runtime.session() as s:
            s.get(Node, me.public_key_hex).channel_connected = True
    return me


def _admit(runtime, credit: int, max_tokens: int = 100, **routing) -> InferenceRequest:
    with runtime.session() as s:
        account, _ = create_account(s, "buyer", credit)
        body = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=max_tokens, routing=routing or None)
        return admit(s, account, body, "chat", runtime.settings).request


def _routable(runtime, **kw) -> set[str]:
    with runtime.session() as s:
        return {c.node.id for c in candidates(s, runtime.settings, "tiny", **kw)}


def test_prices_above_the_operators_ceiling_are_refused_at_registration(client, runtime):
    me = Identity.generate()
    greedy = ModelOffer(model="tiny", price_in=100, price_out=10**15, tokens_per_s=50.0)
    r = post(client, "/v1/nodes/register", registration(me, models=[greedy]).sign(me))
    assert r.status_code == 400 and r.json()["error"]["code"] == "price_above_ceiling"
    assert "ceiling" in r.json()["error"]["message"]


def test_an_expensive_seller_does_not_turn_away_a_buyer_a_cheap_one_can_serve(client, runtime):
    cheap = _seller(client, runtime)
    dear = _seller(client, runtime, price_in=CEILING, price_out=CEILING)
    prompt_est = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "hi"}]).prompt_bytes()
    cheap_hold = request_cost(prompt_est, 100, 100_000_000, 200_000_000)
    poor = _admit(runtime, credit=cheap_hold * 2)  # cannot afford the hold at the dear node's price
    assert poor.hold_amount == cheap_hold
    assert poor.routing["max_price"] == 200_000_000 and poor.routing["max_price_in"] == 100_000_000
    rich = _admit(runtime, credit=10**12)
    assert rich.hold_amount == request_cost(prompt_est, 100, CEILING, CEILING)  # covers any node
    # and the dispatch round keeps the poor buyer's request within what its hold covers
    from scheduler.dispatch import route_in_groups
    from scheduler.routing import get_policy

    pending = {r.id: r for r in runtime.store.pending(10)}
    nodes = runtime.store.nodes({"tiny"})
    assert {n.id for n in nodes} == {cheap.public_key_hex, dear.public_key_hex}
    for _ in range(5):
        d = route_in_groups(get_policy(None), [pending[poor.id]], nodes)
        assert d.assignments.get(poor.id) == cheap.public_key_hex
    with pytest.raises(APIError) as exc:  # one that cannot afford even the cheapest: 402
        _admit(runtime, credit=cheap_hold - 1)
    assert exc.value.status_code == 402


def test_a_node_below_the_minimum_stake_is_not_routed_until_it_tops_up(client, runtime):
    runtime.settings.min_stake_nano_usd = 1_000
    me = _seller(client, runtime, stake=1_000)
    assert _routable(runtime) == {me.public_key_hex}
    r = post(client, "/v1/nodes/me/unbond",
             UnbondRequest(node_id=me.public_key_hex, **fresh_stamp(), amount=1, idempotency_key="u").sign(me))
    assert r.status_code == 200, r.text
    assert _routable(runtime) == set()  # unbonding leaves 999 bonded
    with runtime.session() as s:
        why = reasons(s, runtime.settings, [s.get(Node, me.public_key_hex)])[me.public_key_hex]
    assert "below the market's minimum" in why
    models = client.get("/v1/models").json()["data"]
    assert models[0]["live_nodes"] == 0
    r = client.post(f"/admin/nodes/{me.public_key_hex}/stake", headers={"Authorization": "Bearer admin-secret"},
                    json={"amount_nano_usd": 1, "idempotency_key": "top-up"})
    assert r.status_code == 200, r.text
    assert _routable(runtime) == {me.public_key_hex}


def test_unverifiable_engines_are_routed_only_with_operator_and_buyer_opt_in(client, runtime):
    plain = _seller(client, runtime, token_ids=False, logprobs=False, can_verify=False)
    assert _routable(runtime) == set() and _routable(runtime, allow_unverified=True) == set()
    runtime.settings.allow_unverified_nodes = True
    assert _routable(runtime) == set()  # the buyer did not ask
    assert _routable(runtime, allow_unverified=True) == {plain.public_key_hex}
    with pytest.raises(APIError) as exc:
        _admit(runtime, credit=10**9)
    assert exc.value.status_code == 503
    assert _admit(runtime, credit=10**9, allow_unverified=True).routing["allow_unverified"] is True
    m = client.get("/v1/models").json()["data"][0]
    assert (m["live_nodes"], m["unverified_nodes"]) == (0, 1)


def test_a_verify_only_node_is_never_sold_work(client, runtime):
    v = _seller(client, runtime, price_in=0, price_out=0, verify_only=True)
    assert _routable(runtime) == set()
    assert client.get("/v1/nodes").json()[0]["not_routable_because"].startswith("an operator-run verifier")
    del v


def test_the_newest_work_channel_wins_and_closing_an_old_one_unroutes_nothing(client, runtime):
    me = _seller(client, runtime, connected=False)
    hello = lambda: ChannelHello(node_id=me.public_key_hex, **fresh_stamp()).sign(me).model_dump(mode="json")  # noqa: E731
    with client.websocket_connect("/v1/nodes/channel") as first:
        first.send_json(hello())
        assert first.receive_json()["type"] == "welcome"
        with client.websocket_connect("/v1/nodes/channel") as second:
            second.send_json(hello())
            assert second.receive_json()["type"] == "welcome"
            # the older channel is told it was superseded and closed by the coordinator
            while (frame := first.receive_json())["type"] == "ping":
                pass
            assert frame == {"type": "refused", "reason": "superseded by a newer work channel of this node"}
            assert _routable(runtime) == {me.public_key_hex}
        deadline = time.monotonic() + 5  # the server notices the close on its own thread
        while _routable(runtime) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _routable(runtime) == set()  # the newest one closed: now it is gone
