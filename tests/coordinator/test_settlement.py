"""Settlement: the coordinator pays for what it relayed, exactly once, at the locked price.

Attacks a node might try on the money path — inflating the token count, changing the
tokens after the fact, signing for another node, replaying a receipt — are refused and
move no money."""

from __future__ import annotations

import pytest

from coordinator.account_service import create_account
from coordinator.admission import admit
from coordinator.models import InferenceRequest, Node, RequestStatus
from coordinator.node_registry import register
from coordinator.schemas import ChatCompletionRequest
from coordinator.settlement import ReceiptRejected, Relayed, settle
from node_agent.identity import Identity
from protocol import ModelOffer, Receipt, Registration, commitment_of, fresh_stamp
from pricing.ledger import AccountKind, Ledger, total_balance
from pricing.money import fee_of, request_cost
from scheduler.routing import Decision

CREDIT = 10**9
PRICE_IN, PRICE_OUT = 100_000_000, 200_000_000


def _node(rt, price_out=PRICE_OUT) -> Identity:
    me = Identity.generate()
    reg = Registration(node_id=me.public_key_hex, **fresh_stamp(), region="us-east", max_concurrency=4,
                       models=[ModelOffer(model="tiny", price_in=PRICE_IN, price_out=price_out,
                                          tokens_per_s=100.0)]).sign(me)
    with rt.session() as s:
        node = register(s, reg, rt.settings)
        node.channel_connected = True
    return me


def _request(rt, node: Identity, max_tokens=20) -> tuple[str, int]:
    with rt.session() as s:
        account, _ = create_account(s, "buyer", CREDIT)
        body = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                     max_tokens=max_tokens)
        rid = admit(s, account, body, "chat", rt.settings).request.id
    applied = rt.store.apply(Decision(assignments={rid: node.public_key_hex}))
    assert applied.assigned == 1
    return rid, account.ledger_account_id


def _receipt(node: Identity, rid: str, ids: list[int], lps: list[int], *, signer: Identity | None = None,
             count: int | None = None, prompt_tokens: int = 7) -> Receipt:
    return Receipt(node_id=node.public_key_hex, **fresh_stamp(), request_id=rid, model="tiny",
                   prompt_tokens=prompt_tokens, completion_tokens=len(ids) if count is None else count,
                   commitment=commitment_of(rid, ids, lps), finish_reason="length").sign(signer or node)


def _balances(rt, buyer: int, node: Identity) -> tuple[int, int, int]:
    with rt.session() as s:
        led = Ledger(s)
        earnings = s.get(Node, node.public_key_hex).earnings_account_id
        return led.balance(buyer), led.balance(earnings), total_balance(s)


def test_honest_receipt_pays_locked_price_for_relayed_tokens(runtime):
    node = _node(runtime)
    rid, buyer = _request(runtime, node)
    ids, lps = [5, 6, 7, 8, 9], [-100, -200, -300, -400, -500]
    with runtime.session() as s:
        result = settle(s, _receipt(node, rid, ids, lps), node.public_key_hex,
                        Relayed(5, commitment_of(rid, ids, lps)), runtime.settings)
    cost = request_cost(7, 5, PRICE_IN, PRICE_OUT)
    assert (result.completion_tokens, result.cost) == (5, cost)
    b, e, total = _balances(runtime, buyer, node)
    assert b == CREDIT - cost
    assert e == cost - fee_of(cost, runtime.settings.platform_fee_bps)
    assert total == 0
    with runtime.session() as s:  # settling again changes nothing
        again = settle(s, _receipt(node, rid, ids, lps), node.public_key_hex,
                       Relayed(5, commitment_of(rid, ids, lps)), runtime.settings)
    assert again == result
    assert _balances(runtime, buyer, node) == (b, e, 0)


@pytest.mark.parametrize("attack", ["inflated_count", "changed_tokens", "other_signer", "other_node"])
def test_dishonest_receipts_are_refused_and_move_no_money(runtime, attack):
    node, other = _node(runtime), _node(runtime)
    rid, buyer = _request(runtime, node)
    ids, lps = [5, 6, 7], [-100, -200, -300]
    relayed = Relayed(3, commitment_of(rid, ids, lps))
    receipt = {
        "inflated_count": lambda: _receipt(node, rid, ids, lps, count=30),
        "changed_tokens": lambda: _receipt(node, rid, [5, 6, 99], lps),
        "other_signer": lambda: _receipt(node, rid, ids, lps, signer=other),
        "other_node": lambda: _receipt(other, rid, ids, lps),
    }[attack]()
    before = _balances(runtime, buyer, node)
    with runtime.session() as s, pytest.raises(Exception) as exc:
        settle(s, receipt, node.public_key_hex if attack != "other_node" else other.public_key_hex,
               relayed, runtime.settings)
    assert isinstance(exc.value, ReceiptRejected) or getattr(exc.value, "status_code", None) == 401
    assert _balances(runtime, buyer, node) == before


def test_replayed_receipt_cannot_settle_another_request(runtime):
    node = _node(runtime)
    rid1, _ = _request(runtime, node)
    rid2, buyer2 = _request(runtime, node)
    ids, lps = [1, 2], [-1, -2]
    first = _receipt(node, rid1, ids, lps)
    with runtime.session() as s:
        settle(s, first, node.public_key_hex, Relayed(2, commitment_of(rid1, ids, lps)), runtime.settings)
    before = _balances(runtime, buyer2, node)
    replay = first.model_copy(update={"request_id": rid2})  # signature no longer matches
    with runtime.session() as s, pytest.raises(Exception):
        settle(s, replay, node.public_key_hex, Relayed(2, commitment_of(rid2, ids, lps)), runtime.settings)
    assert _balances(runtime, buyer2, node) == before


def test_failover_pays_each_node_for_its_own_tokens(runtime):
    from coordinator.failover import fail_over

    a, b = _node(runtime), _node(runtime, price_out=PRICE_OUT // 2)
    rid, buyer = _request(runtime, a, max_tokens=10)
    with runtime.session() as s:
        assert fail_over(s, rid, a.public_key_hex, [11, 12, 13])
        assert not fail_over(s, rid, a.public_key_hex, [11, 12, 13])  # once only
    with runtime.session() as s:
        req = s.get(InferenceRequest, rid)
        assert req.status == RequestStatus.QUEUED and req.payload["prefix_token_ids"] == [11, 12, 13]
        assert s.get(Node, a.public_key_hex).backoff_until is not None
    assert runtime.store.apply(Decision(assignments={rid: b.public_key_hex})).assigned == 1
    ids, lps = [14, 15], [-1, -2]
    with runtime.session() as s:
        result = settle(s, _receipt(b, rid, ids, lps), b.public_key_hex,
                        Relayed(2, commitment_of(rid, ids, lps)), runtime.settings)
    cost_a = request_cost(7, 3, PRICE_IN, PRICE_OUT)
    cost_b = request_cost(0, 2, PRICE_IN, PRICE_OUT // 2)
    assert result.completion_tokens == 5 and result.cost == cost_a + cost_b
    fee = runtime.settings.platform_fee_bps
    with runtime.session() as s:
        led = Ledger(s)
        ea = led.balance(s.get(Node, a.public_key_hex).earnings_account_id)
        eb = led.balance(s.get(Node, b.public_key_hex).earnings_account_id)
        assert (ea, eb) == (cost_a - fee_of(cost_a, fee), cost_b - fee_of(cost_b, fee))
        assert led.balance(buyer) == CREDIT - cost_a - cost_b
        assert total_balance(s) == 0


def test_rejection_and_timeouts_release_the_whole_hold(runtime):
    from coordinator.settlement import fail_request

    node = _node(runtime)
    with runtime.session() as s:
        account, _ = create_account(s, "buyer", CREDIT)
        body = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=50)
        r1 = admit(s, account, body, "chat", runtime.settings).request.id
        r2 = admit(s, account, body, "chat", runtime.settings).request.id
        assert Ledger(s).balance(account.ledger_account_id) < CREDIT
    assert runtime.store.apply(Decision(rejections={r1: "no node meets max_ttft_ms"})).rejected == 1
    assert runtime.store.apply(Decision(rejections={r1: "again"})).rejected == 0  # idempotent
    with runtime.session() as s:
        assert fail_request(s, r2, "timed out")
        assert not fail_request(s, r2, "timed out")
    with runtime.session() as s:
        assert Ledger(s).balance(account.ledger_account_id) == CREDIT
        assert s.get(InferenceRequest, r1).status == RequestStatus.REJECTED
        assert s.get(InferenceRequest, r1).error == "no node meets max_ttft_ms"
    _ = node


def test_dispatch_assigns_once_under_capacity(runtime):
    from scheduler.dispatch import run_dispatch

    node = _node(runtime)  # max_concurrency 4
    with runtime.session() as s:
        account, _ = create_account(s, "buyer", CREDIT)
        body = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5)
        rids = [admit(s, account, body, "chat", runtime.settings).request.id for _ in range(6)]
    first = run_dispatch(runtime.store)
    assert (first.pending, first.applied.assigned) == (6, 4)
    second = run_dispatch(runtime.store)  # two still queued, node full
    assert (second.pending, second.applied.assigned) == (2, 0)
    with runtime.session() as s:
        statuses = [s.get(InferenceRequest, r).status for r in rids]
        prices = {s.get(InferenceRequest, r).price_out for r in rids[:4]}
    assert statuses.count(RequestStatus.ASSIGNED) == 4 and statuses.count(RequestStatus.QUEUED) == 2
    assert prices == {PRICE_OUT}
    _ = (node, AccountKind)


def test_a_burst_is_spread_by_each_nodes_batching_curve(runtime):
    """Two nodes at the same price: the one whose streams slow down fast with batching
    takes a small share of a burst; the flat-curve node takes the rest."""
    from coordinator.models import Node
    from scheduler.dispatch import run_dispatch

    steep, flat = _node(runtime), _node(runtime)
    with runtime.session() as s:
        s.get(Node, steep.public_key_hex).benchmark = {"batches": [
            {"batch": 1, "decode_tok_s": 100.0}, {"batch": 8, "decode_tok_s": 200.0}]}  # per stream 25 at 8
        s.get(Node, flat.public_key_hex).benchmark = {"batches": [
            {"batch": 1, "decode_tok_s": 100.0}, {"batch": 8, "decode_tok_s": 780.0}]}
        for n in (steep, flat):
            s.get(Node, n.public_key_hex).max_concurrency = 8
    with runtime.session() as s:
        account, _ = create_account(s, "buyer", CREDIT)
        body = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5)
        for _ in range(10):
            admit(s, account, body, "chat", runtime.settings)
    run_dispatch(runtime.store)
    with runtime.session() as s:
        from sqlmodel import select

        placed = [r.node_id for r in s.exec(select(InferenceRequest)).all() if r.node_id]
    assert placed.count(steep.public_key_hex) <= 2 < placed.count(flat.public_key_hex)
