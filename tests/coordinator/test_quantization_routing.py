"""Buyers choose the weight precision they accept (`routing.quantization`): an int8 offer is
routed to or left out as the buyer asks, /v1/models counts offers per precision, and a filter
no live offer meets is refused with a clear 400 — through the official client."""

from __future__ import annotations

import openai
import pytest

from coordinator.account_service import create_account
from coordinator.admission import admit
from coordinator.models import RequestStatus
from coordinator.placement import choose
from coordinator.schemas import ChatCompletionRequest
from tests.coordinator.test_routability import _seller


@pytest.fixture
def market(client, runtime):
    full = _seller(client, runtime, price_out=200_000_000)
    int8 = _seller(client, runtime, price_out=100_000_000, quantization="int8")  # cheaper: wins unless filtered
    with runtime.session() as s:
        _, key = create_account(s, "buyer", 10**12)
    return full.public_key_hex, int8.public_key_hex, key


def _official(client, key) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client)


def _placed(runtime, quantization) -> str | None:
    with runtime.session() as s:
        account, _ = create_account(s, "b", 10**12)
        body = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                     routing={"quantization": quantization} if quantization else None)
        req = admit(s, account, body, "chat", runtime.settings, hold=False).request
        node = choose(s, req, runtime.settings)
        req.status = RequestStatus.CANCELLED  # out of the queue: the next one is not behind it
        return node


def test_the_buyers_precision_filter_decides_which_offer_is_routed(runtime, market):
    full, int8, _ = market
    assert _placed(runtime, None) == int8  # any precision: the cheaper offer
    assert _placed(runtime, ["none"]) == full  # full precision only
    assert _placed(runtime, ["int8"]) == int8
    assert _placed(runtime, ["NONE", "int8"]) == int8  # names are case-insensitive


def test_models_list_counts_offers_per_precision_through_the_official_client(client, market):
    models = _official(client, market[2]).models.list().data
    assert models[0].model_extra["quantization"] == {"int8": 1, "none": 1}


def test_a_precision_no_live_offer_has_is_refused_clearly(client, market):
    c = _official(client, market[2])
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                  extra_body={"routing": {"quantization": ["fp8"]}})
    assert exc.value.body["code"] == "no_node_with_quantization"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                  extra_body={"routing": {"quantization": ["int 8; drop"]}})


def test_a_dispatch_round_keeps_each_buyers_precision_and_the_shortlist_keeps_eligible_nodes():
    from scheduler.dispatch import route_in_groups
    from scheduler.routing import NodeState, PendingRequest, get_policy
    from scheduler.shortlist import shortlist

    def node(i, q, price):
        return NodeState(id=f"n{i}", model="tiny", price_in=price, price_out=price, tokens_per_s=50.0, region="us-east",
                         free_slots=1, quantization=q)

    # 700 cheap int8 offers and one dear full-precision one: a buyer of full precision must
    # still find it although the shortlist keeps only the best few hundred
    nodes = [node(i, "int8", 100) for i in range(700)] + [node(999, "none", 10_000)]
    full = PendingRequest(id="full", model="tiny", prompt_tokens=10, max_tokens=10, quantization=("none",))
    any_ = PendingRequest(id="any", model="tiny", prompt_tokens=10, max_tokens=10)
    assert "n999" in {n.id for n in shortlist(nodes, full)}
    d = route_in_groups(get_policy(), [full, any_], nodes)
    assert d.assignments["full"] == "n999" and d.assignments["any"] != "n999"
