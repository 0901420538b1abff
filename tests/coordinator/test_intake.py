"""A request's admission transaction (`coordinator.intake`): the hold is tried at the price
of every offer without reading the balance first. A buyer that price does not cover is
narrowed to the offers it can afford and placed on one of them, in the same transaction;
a buyer who cannot afford even the cheapest is refused with nothing written."""

from __future__ import annotations

import pytest
from sqlmodel import select

from coordinator.account_service import create_account
from coordinator.admission import new_request_id
from coordinator.errors import APIError
from coordinator.intake import admit_and_place
from coordinator.models import InferenceRequest, RequestStatus
from coordinator.schemas import ChatCompletionRequest
from coordinator.settings import CoordinatorSettings
from pricing.ledger import Ledger
from pricing.money import request_cost
from tests.coordinator.test_routability import CEILING, _seller

BODY = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=100)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def settings(request, tmp_path) -> CoordinatorSettings:
    """Both stores: on PostgreSQL the placement steps run in savepoints, on SQLite not. The
    dear seller asks $100 per million tokens (the default ceiling): on PostgreSQL its
    registration failed with a 500 while prices were 32-bit columns (at most $2.147)."""
    url = f"sqlite:///{tmp_path / 't.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    return CoordinatorSettings(home=tmp_path, database_url=url, run_worker_in_process=False, assign_timeout_s=2.0,
                               admin_token="admin-secret")


def _market(client, runtime):
    cheap = _seller(client, runtime)
    dear = _seller(client, runtime, price_in=CEILING, price_out=CEILING)
    runtime.market.mark([cheap.public_key_hex, dear.public_key_hex])
    prompt = ChatCompletionRequest(**BODY).prompt_bytes()
    return cheap, dear, request_cost(prompt, 100, 100_000_000, 200_000_000), request_cost(prompt, 100, CEILING, CEILING)


def _buyer(runtime, credit: int):
    with runtime.session() as s:
        account, _ = create_account(s, "buyer", credit)
    return account


def _balance(runtime, account) -> int:
    with runtime.session() as s:
        return Ledger(s).balance(account.ledger_account_id)


def _rows(runtime, account) -> list[InferenceRequest]:
    with runtime.session() as s:
        return list(s.exec(select(InferenceRequest).where(InferenceRequest.account_id == account.id)).all())


def test_a_buyer_the_dearest_offer_is_too_dear_for_is_held_and_placed_on_one_it_can_afford(client, runtime):
    cheap, dear, cheap_hold, dear_hold = _market(client, runtime)
    poor = _buyer(runtime, cheap_hold * 2)
    (req,), replay, (node,) = admit_and_place(runtime, poor, ChatCompletionRequest(**BODY), "chat",
                                              [new_request_id()], None)
    assert not replay and node == cheap.public_key_hex
    assert req.hold_amount == cheap_hold and req.routing["max_price"] == 200_000_000
    assert _balance(runtime, poor) == cheap_hold  # one hold, at the price it can afford
    (row,) = _rows(runtime, poor)
    assert row.status == RequestStatus.ASSIGNED and row.node_id == cheap.public_key_hex and row.hold_id
    assert row.price_out == 200_000_000 and row.hold_amount == cheap_hold

    rich = _buyer(runtime, 10**12)
    (req,), _, (node,) = admit_and_place(runtime, rich, ChatCompletionRequest(**BODY), "chat", [new_request_id()], None)
    assert req.hold_amount == dear_hold and node is not None  # covers any node
    assert _balance(runtime, rich) == 10**12 - dear_hold


def test_a_buyer_who_cannot_afford_the_cheapest_offer_is_refused_with_nothing_written(client, runtime):
    _, _, cheap_hold, _ = _market(client, runtime)
    broke = _buyer(runtime, cheap_hold - 1)
    with pytest.raises(APIError) as exc:
        admit_and_place(runtime, broke, ChatCompletionRequest(**BODY), "chat", [new_request_id()], None)
    assert exc.value.status_code == 402
    assert _balance(runtime, broke) == cheap_hold - 1 and _rows(runtime, broke) == []


def test_choices_are_all_held_or_none_is(client, runtime):
    _, _, cheap_hold, _ = _market(client, runtime)
    one = _buyer(runtime, cheap_hold + cheap_hold // 2)  # one choice's hold, not two
    with pytest.raises(APIError) as exc:
        admit_and_place(runtime, one, ChatCompletionRequest(**BODY, n=2), "chat",
                        [new_request_id(), new_request_id()], None)
    assert exc.value.status_code == 402 and "these 2 choices" in exc.value.body()["error"]["message"]
    assert _balance(runtime, one) == cheap_hold + cheap_hold // 2 and _rows(runtime, one) == []
    two = _buyer(runtime, cheap_hold * 2)
    reqs, _, nodes = admit_and_place(runtime, two, ChatCompletionRequest(**BODY, n=2), "chat",
                                     [new_request_id(), new_request_id()], None)
    assert [r.hold_amount for r in reqs] == [cheap_hold] * 2 and all(nodes)
    assert _balance(runtime, two) == 0
