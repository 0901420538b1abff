"""The settle task pays a backlog of accepted receipts in one ledger batch: each request
exactly once, at its locked price, on SQLite and PostgreSQL, also with concurrent tasks."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from coordinator.db import create_all, make_engine
from coordinator.delivery import Delivery, acknowledge
from coordinator.models import InferenceRequest, Node, RequestStatus
from coordinator.runtime import Runtime
from coordinator.settings import CoordinatorSettings
from coordinator.settlement import Relayed, accept_receipt, settle_accepted_batch
from protocol import commitment_of
from pricing.errors import HoldNotPending
from pricing.ledger import Ledger, total_balance
from pricing.money import fee_of, request_cost
from tests.conftest import fresh_pg_database
from tests.coordinator.test_settlement import CREDIT, PRICE_IN, PRICE_OUT, _node, _receipt, _request


@pytest.fixture(params=["sqlite", "postgres"])
def rt(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 't.db'}"
        yield from _runtime(tmp_path, url)
    else:
        with fresh_pg_database() as url:
            yield from _runtime(tmp_path, url)


def _runtime(tmp_path, url):
    settings = CoordinatorSettings(home=tmp_path, database_url=url, run_worker_in_process=False)
    engine = make_engine(url)
    create_all(engine)
    runtime = Runtime(settings, engine=engine)
    yield runtime
    runtime.stop()
    engine.dispose()


def _accepted(rt, node, n: int) -> list[tuple[str, int, int]]:
    """n requests, each with a stored receipt for i+1 tokens: (request id, buyer account, tokens)."""
    out = []
    for i in range(n):
        rid, buyer = _request(rt, node)
        ids = list(range(5, 6 + i))
        lps = [-100] * len(ids)
        with rt.session() as s:
            accept_receipt(s, _receipt(node, rid, ids, lps), node.public_key_hex,
                           Relayed(len(ids), commitment_of(rid, ids, lps)), rt.settings)
            acknowledge(s, rid, len(ids), Delivery.COMPLETE)  # as the buyer's handler does
        out.append((rid, buyer, len(ids)))
    return out


def _check_paid(rt, node, accepted) -> None:
    fee_bps = rt.settings.platform_fee_bps
    with rt.session() as s:
        led = Ledger(s)
        earned = 0
        for rid, buyer, tokens in accepted:
            req = s.get(InferenceRequest, rid)
            cost = request_cost(7, tokens, PRICE_IN, PRICE_OUT)
            assert (req.status, req.cost, req.completion_tokens) == (RequestStatus.COMPLETED, cost, tokens)
            assert led.balance(buyer) == CREDIT - cost
            earned += cost - fee_of(cost, fee_bps)
        assert led.balance(s.get(Node, node.public_key_hex).earnings_account_id) == earned
        assert total_balance(s) == 0


def test_one_task_pays_the_backlog_once(rt):
    node = _node(rt)
    accepted = _accepted(rt, node, 6)
    first = rt.store.settle(accepted[2][0])
    assert first["settled"] and first["batch"] == 6
    _check_paid(rt, node, accepted)
    for rid, _, _ in accepted:  # the other tasks (and redeliveries) find their request paid
        again = rt.store.settle(rid)
        assert again["settled"] and again["batch"] == 1
    _check_paid(rt, node, accepted)


def test_a_failing_item_leaves_only_its_request_unpaid(rt):
    node = _node(rt)
    accepted = _accepted(rt, node, 3)
    broken = accepted[1][0]
    with rt.session() as s:  # its hold was voided behind the coordinator's back
        Ledger(s).void_hold(s.get(InferenceRequest, broken).hold_id, idempotency_key="test-void")
    with rt.session() as s:
        results = settle_accepted_batch(s, accepted[0][0], rt.settings)
    assert isinstance(results[broken], HoldNotPending)
    with rt.session() as s:
        assert s.get(InferenceRequest, broken).status == RequestStatus.SETTLING
        assert total_balance(s) == 0
    _check_paid(rt, node, [a for a in accepted if a[0] != broken])


def test_concurrent_tasks_split_the_backlog(rt):
    if rt.settings.effective_database_url.startswith("sqlite"):
        pytest.skip("SQLite serialises writers: nothing to split")
    node = _node(rt)
    accepted = _accepted(rt, node, 24)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(rt.store.settle, [rid for rid, _, _ in accepted]))
    assert all(r["settled"] for r in results)
    _check_paid(rt, node, accepted)


def test_a_task_whose_request_is_already_paid_still_pays_the_others(rt):
    node = _node(rt)
    first = _accepted(rt, node, 1)
    assert rt.store.settle(first[0][0])["settled"]
    later = _accepted(rt, node, 3)
    again = rt.store.settle(first[0][0])  # e.g. redelivered, or the sweep's resend
    assert again["settled"] and again["batch"] == 4
    _check_paid(rt, node, first + later)


def test_receipts_accepted_while_a_settle_task_waits_ride_on_it(rt, monkeypatch):
    """One settle task stands for every receipt accepted while it is pending: the broker
    gets one message, not one per request, and every receipt is still paid exactly once."""
    from scheduler.tasks import settle

    sent = []
    monkeypatch.setattr(settle, "apply_async", lambda args, **kw: sent.append(args[0]))
    node = _node(rt)
    accepted = _accepted(rt, node, 5)
    for rid, _, _ in accepted:
        rt.enqueue_settle(rid)
    assert sent == [accepted[0][0]]
    assert rt.store.settle(sent[0])["batch"] == 5  # the task clears the flag, then reads its batch
    _check_paid(rt, node, accepted)
    more = _accepted(rt, node, 1)
    rt.enqueue_settle(more[0][0])  # accepted after that task started: a task of its own
    assert sent == [accepted[0][0], more[0][0]]
    rt.store.settle(more[0][0])
    _check_paid(rt, node, accepted + more)
