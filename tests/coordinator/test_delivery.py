"""The buyer pays for what its handler wrote to it, never for what the market lost.

Each delivery outcome (complete, buyer gone, relay broken, never acknowledged) settled on
SQLite and PostgreSQL: the buyer's charge, the node's pay, who covers the difference, and
the books summing to zero; settlement waits for the acknowledgement, and the sweep
settles a receipt whose acknowledgement never comes as undelivered."""

from __future__ import annotations

from datetime import timedelta

import pytest

from coordinator.db import create_all, make_engine
from coordinator.delivery import Delivery, Quote, acknowledge
from coordinator.models import InferenceRequest, Node, ReceiptRecord, RequestStatus
from coordinator.models.account import utcnow
from coordinator.runtime import Runtime
from coordinator.settings import CoordinatorSettings
from coordinator.settlement import Relayed, accept_receipt
from protocol import commitment_of
from pricing.ledger import AccountKind, Ledger, total_balance
from pricing.money import fee_of, request_cost
from tests.conftest import fresh_pg_database
from tests.coordinator.test_settlement import CREDIT, PRICE_IN, PRICE_OUT, _node, _receipt, _request

FEE = 500
PROMPT = 7


# ---------------------------------------------------------------- the rule, pure
def test_quote_charges_the_buyer_only_what_it_was_written():
    q = Quote(PROMPT, ((PRICE_IN, PRICE_OUT, 10),), hold=10**9)
    full = request_cost(PROMPT, 10, PRICE_IN, PRICE_OUT)
    assert q.buyer_cost(10, Delivery.COMPLETE) == full == sum(q.seller_gross())
    assert q.buyer_cost(4, Delivery.RELAY_BROKEN) == request_cost(PROMPT, 4, PRICE_IN, PRICE_OUT)
    assert q.buyer_cost(99, Delivery.COMPLETE) == full  # never more than was relayed
    # nothing delivered: not even the prompt, unless the answer was complete (and empty)
    assert q.buyer_cost(0, Delivery.RELAY_BROKEN) == q.buyer_cost(0, Delivery.UNACKED) == 0
    assert q.buyer_cost(0, Delivery.BUYER_GONE) == 0
    assert Quote(PROMPT, ((PRICE_IN, PRICE_OUT, 0),), 10**9).buyer_cost(0, Delivery.COMPLETE) == \
        request_cost(PROMPT, 0, PRICE_IN, PRICE_OUT)


def test_quote_subsidy_makes_the_node_whole_only_when_the_market_lost_the_tokens():
    q = Quote(PROMPT, ((PRICE_IN, PRICE_OUT, 10),), hold=10**9)
    net = lambda g: g - fee_of(g, FEE)  # noqa: E731
    full = request_cost(PROMPT, 10, PRICE_IN, PRICE_OUT)
    for k in (0, 3, 10):
        paid = net(q.buyer_cost(k, Delivery.RELAY_BROKEN))
        assert paid + sum(q.subsidies(k, Delivery.RELAY_BROKEN, FEE)) == net(full)
        assert q.subsidies(k, Delivery.BUYER_GONE, FEE) == [0]  # the buyer left: nobody's sale
    assert q.subsidies(10, Delivery.COMPLETE, FEE) == [0]


def test_quote_allocates_delivered_tokens_across_failover_segments_in_order():
    cheap, dear = (PRICE_IN, PRICE_OUT // 2, 3), (PRICE_IN, PRICE_OUT, 5)
    q = Quote(PROMPT, (cheap, dear), hold=10**9)
    # the buyer got the first segment's 3 tokens and 2 of the second's
    assert q.buyer_gross(5, Delivery.RELAY_BROKEN) == [
        request_cost(PROMPT, 3, PRICE_IN, PRICE_OUT // 2), request_cost(0, 2, PRICE_IN, PRICE_OUT)]
    assert q.buyer_gross(2, Delivery.BUYER_GONE) == [request_cost(PROMPT, 2, PRICE_IN, PRICE_OUT // 2), 0]
    capped = Quote(PROMPT, (cheap, dear), hold=100)
    assert sum(capped.buyer_gross(8, Delivery.COMPLETE)) == 100  # never above the hold


# ---------------------------------------------------------------- settled, both databases
@pytest.fixture(params=["sqlite", "postgres"])
def rt(request, tmp_path):
    def make(url):
        settings = CoordinatorSettings(home=tmp_path, database_url=url, run_worker_in_process=False,
                                       platform_fee_bps=FEE, delivery_ack_timeout_s=30)
        engine = make_engine(url)
        create_all(engine)
        runtime = Runtime(settings, engine=engine)
        runtime.enqueue_settle = lambda rid: None  # the tests run the settle task themselves
        return runtime, engine

    if request.param == "sqlite":
        runtime, engine = make(f"sqlite:///{tmp_path / 't.db'}")
        yield runtime
    else:
        with fresh_pg_database() as url:
            runtime, engine = make(url)
            yield runtime
            runtime.stop()
            engine.dispose()
            return
    runtime.stop()
    engine.dispose()


def _served(rt, node, tokens: int = 10) -> tuple[str, int]:
    """A request whose node relayed `tokens` tokens and sent a matching receipt."""
    rid, buyer = _request(rt, node, max_tokens=20)
    ids, lps = list(range(5, 5 + tokens)), [-100] * tokens
    with rt.session() as s:
        accepted = accept_receipt(s, _receipt(node, rid, ids, lps, prompt_tokens=PROMPT), node.public_key_hex,
                                  Relayed(tokens, commitment_of(rid, ids, lps)), rt.settings)
    assert accepted.fresh and not accepted.ready
    return rid, buyer


def _books(rt, buyer, node) -> dict:
    with rt.session() as s:
        led = Ledger(s)
        return {"buyer": led.balance(buyer),
                "node": led.balance(s.get(Node, node.public_key_hex).earnings_account_id),
                "fees": led.system_balance(AccountKind.PLATFORM_FEES),
                "external": led.system_balance(AccountKind.EXTERNAL), "total": total_balance(s)}


@pytest.mark.parametrize("delivery,delivered", [
    (Delivery.COMPLETE, 10), (Delivery.BUYER_GONE, 4), (Delivery.RELAY_BROKEN, 4), (Delivery.RELAY_BROKEN, 0)])
def test_each_outcome_charges_the_buyer_for_what_it_got(rt, delivery, delivered):
    node = _node(rt)
    rid, buyer = _served(rt, node)
    assert not rt.store.settle(rid)["settled"]  # the receipt alone pays nothing
    before = _books(rt, buyer, node)
    with rt.session() as s:
        assert acknowledge(s, rid, delivered, delivery)  # the receipt is in: settle now
        assert not acknowledge(s, rid, 10, Delivery.COMPLETE)  # the first acknowledgement wins
    result = rt.store.settle(rid)
    assert result["settled"]
    charged = request_cost(PROMPT if delivered else 0, delivered, PRICE_IN, PRICE_OUT)
    full = request_cost(PROMPT, 10, PRICE_IN, PRICE_OUT)
    net = lambda g: g - fee_of(g, FEE)  # noqa: E731
    after = _books(rt, buyer, node)
    assert result["cost"] == charged and after["buyer"] == CREDIT - charged
    assert after["node"] == (net(full) if delivery.market_fault else net(charged))
    assert after["total"] == 0
    with rt.session() as s:
        req = s.get(InferenceRequest, rid)
        assert (req.status, req.completion_tokens, req.cost) == (RequestStatus.COMPLETED, delivered, charged)
    assert rt.store.settle(rid) == result  # a redelivered task moves nothing
    assert _books(rt, buyer, node) == after
    del before


def test_platform_pays_relay_losses_from_fees_then_from_the_operator(rt):
    """With no fees collected yet, the node's lost tokens come out of EXTERNAL (the
    operator's own money), never out of the buyer."""
    node = _node(rt)
    rid, buyer = _served(rt, node)
    with rt.session() as s:
        acknowledge(s, rid, 2, Delivery.RELAY_BROKEN)
    rt.store.settle(rid)
    books = _books(rt, buyer, node)
    charged = request_cost(PROMPT, 2, PRICE_IN, PRICE_OUT)
    full = request_cost(PROMPT, 10, PRICE_IN, PRICE_OUT)
    assert books["buyer"] == CREDIT - charged
    assert books["node"] == full - fee_of(full, FEE)
    assert books["fees"] >= 0 and books["total"] == 0
    assert books["external"] < -CREDIT  # the buyer's deposit, plus the operator's subsidy


def test_buyer_gone_before_the_receipt_settles_when_the_receipt_arrives(rt):
    node = _node(rt)
    rid, buyer = _request(rt, node, max_tokens=20)
    with rt.session() as s:
        assert not acknowledge(s, rid, 3, Delivery.BUYER_GONE)  # no receipt yet: nothing to settle
    ids, lps = list(range(5, 13)), [-100] * 8  # the node made 8 before the cancel reached it
    with rt.session() as s:
        accepted = accept_receipt(s, _receipt(node, rid, ids, lps, prompt_tokens=PROMPT), node.public_key_hex,
                                  Relayed(8, commitment_of(rid, ids, lps)), rt.settings)
    assert accepted.ready
    assert rt.store.settle(rid)["cost"] == request_cost(PROMPT, 3, PRICE_IN, PRICE_OUT)
    assert _books(rt, buyer, node)["total"] == 0


def test_a_receipt_never_acknowledged_is_settled_as_undelivered_by_the_sweep(rt):
    node = _node(rt)
    rid, buyer = _served(rt, node)
    assert rid not in rt.store.sweep()["unacked"]  # still within the acknowledgement window
    with rt.session() as s:
        s.get(ReceiptRecord, rid).created_at = utcnow() - timedelta(seconds=31)
    sweep = rt.store.sweep()
    assert sweep["unacked"] == [rid] and rid in sweep["settle_resent"]
    rt.store.settle(rid)
    books = _books(rt, buyer, node)
    full = request_cost(PROMPT, 10, PRICE_IN, PRICE_OUT)
    assert books["buyer"] == CREDIT  # the API that served the buyer died: the buyer pays nothing
    assert books["node"] == full - fee_of(full, FEE) and books["total"] == 0
    with rt.session() as s:
        assert s.get(InferenceRequest, rid).delivery == Delivery.UNACKED.value
