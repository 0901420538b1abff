"""The Celery tasks over the coordinator's store: dispatch is idempotent under
redelivery; the sweep (beat) takes nodes offline, puts orphaned assignments back in the
queue, expires holds and prunes old nonces."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlmodel import select

from coordinator.account_service import create_account
from coordinator.admission import admit
from coordinator.db import create_all, make_engine
from coordinator.models import InferenceRequest, Node, NodeNonce, RequestStatus
from coordinator.models.account import utcnow
from coordinator.node_registry import register
from coordinator.runtime import Runtime
from coordinator.schemas import ChatCompletionRequest
from coordinator.settings import CoordinatorSettings
from node_agent.identity import Identity
from protocol import ModelOffer, Registration, fresh_stamp
from pricing.ledger import Ledger, LedgerHold, HoldState
from scheduler import tasks


@pytest.fixture
def rt(tmp_path):
    settings = CoordinatorSettings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 't.db'}",
                                   run_worker_in_process=False, heartbeat_timeout_s=20)
    engine = make_engine(settings.effective_database_url)
    create_all(engine)
    runtime = Runtime(settings, engine=engine)
    yield runtime
    runtime.stop()


_IDENTITIES: dict[str, Identity] = {}


def _node(rt, concurrency=2) -> str:
    me = Identity.generate()
    _IDENTITIES[me.public_key_hex] = me
    reg = Registration(node_id=me.public_key_hex, **fresh_stamp(), region="us-east", max_concurrency=concurrency,
                       models=[ModelOffer(model="tiny", price_in=1000, price_out=2000, tokens_per_s=50.0)]).sign(me)
    with rt.session() as s:
        register(s, reg, rt.settings).channel_connected = True
    return me.public_key_hex


def _queue(rt, n: int) -> tuple[list[str], int]:
    with rt.session() as s:
        acct, _ = create_account(s, "b", 10**9)
        body = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4)
        return [admit(s, acct, body, "chat", rt.settings).request.id for _ in range(n)], acct.ledger_account_id


def _status(rt, rid):
    with rt.session() as s:
        return s.get(InferenceRequest, rid).status


def test_dispatch_task_redelivered_assigns_each_request_once(rt):
    _node(rt, concurrency=8)
    rids, _ = _queue(rt, 3)
    first = tasks.dispatch.apply(kwargs={"window_ms": 0}).get()
    again = tasks.dispatch.apply(kwargs={"window_ms": 0}).get()  # a redelivered copy
    assert first["assigned"] == 3 and again["assigned"] == 0 and again["pending"] == 0
    assert {_status(rt, r) for r in rids} == {RequestStatus.ASSIGNED}


def test_sweep_requeues_orphans_and_marks_silent_nodes_offline(rt):
    node_id = _node(rt)
    rids, _ = _queue(rt, 1)
    tasks.dispatch.apply(kwargs={"window_ms": 0})
    assert _status(rt, rids[0]) == RequestStatus.ASSIGNED
    with rt.session() as s:  # the node falls silent
        s.exec(update(Node).where(Node.id == node_id).values(
            last_heartbeat_at=utcnow() - timedelta(seconds=60)))
    report = tasks.sweep.apply().get()
    assert report["offline"] == [node_id]
    assert report["requeued"] == rids
    with rt.session() as s:
        req = s.get(InferenceRequest, rids[0])
        assert (req.status, req.node_id, req.price_out) == (RequestStatus.QUEUED, None, None)
        assert s.get(Node, node_id).online is False


def test_sweep_expires_overdue_holds_and_prunes_nonces(rt):
    _node(rt)
    _, buyer = _queue(rt, 0)
    with rt.session() as s:
        led = Ledger(s)
        hold = led.create_hold(buyer, 500, idempotency_key="h1", expires_at=utcnow() - timedelta(seconds=1))
        s.add(NodeNonce(node_id="x" * 64, nonce="old-nonce", seen_at=utcnow() - timedelta(hours=1)))
    report = tasks.sweep.apply().get()
    assert report["holds_expired"] == 1 and report["nonces_pruned"] >= 1
    with rt.session() as s:
        assert s.get(LedgerHold, hold.id).state == HoldState.VOIDED
        assert Ledger(s).balance(buyer) == 10**9
    assert tasks.sweep.apply().get()["holds_expired"] == 0


def test_settle_task_survives_a_lost_worker_and_redelivery(rt):
    """The receipt was accepted, then the worker died before paying: the sweep resends the
    settle task; it and any redelivered copy pay exactly once."""
    from coordinator.delivery import Delivery, acknowledge
    from coordinator.settlement import Relayed, accept_receipt
    from protocol import Receipt, commitment_of
    from pricing.ledger import total_balance
    from pricing.money import request_cost

    node_id = _node(rt)
    rids, buyer = _queue(rt, 1)
    rid = rids[0]
    tasks.dispatch.apply(kwargs={"window_ms": 0})
    ids, lps = [3, 4, 5], [-10, -20, -30]
    ident = _IDENTITIES[node_id]
    receipt = Receipt(node_id=node_id, **fresh_stamp(), request_id=rid, model="tiny", prompt_tokens=9,
                      completion_tokens=3, commitment=commitment_of(rid, ids, lps), finish_reason="stop").sign(ident)
    with rt.session() as s:
        assert accept_receipt(s, receipt, node_id, Relayed(3, commitment_of(rid, ids, lps)), rt.settings)
        assert acknowledge(s, rid, 3, Delivery.COMPLETE)  # the buyer's handler got every token
    assert _status(rt, rid) == RequestStatus.SETTLING  # ... and here the worker is lost
    sent = []
    rt.enqueue_settle = sent.append  # capture what the sweep resends
    assert tasks.sweep.apply().get()["settle_resent"] == [rid] and sent == [rid]
    first = tasks.settle.apply(args=[rid]).get()
    again = tasks.settle.apply(args=[rid]).get()  # a redelivered copy
    cost = request_cost(9, 3, 1000, 2000)
    assert first == again == {"request_id": rid, "settled": True, "cost": cost, "batch": 1}
    with rt.session() as s:
        assert Ledger(s).balance(buyer) == 10**9 - cost
        assert total_balance(s) == 0
    assert _status(rt, rid) == RequestStatus.COMPLETED


def test_overdue_requests_are_failed_and_their_holds_released(rt):
    _node(rt)
    rids, buyer = _queue(rt, 1)
    tasks.dispatch.apply(kwargs={"window_ms": 0})
    with rt.session() as s:
        s.exec(update(InferenceRequest).where(InferenceRequest.id == rids[0]).values(
            created_at=utcnow() - timedelta(seconds=rt.settings.request_ttl_s + 5)))
    assert tasks.sweep.apply().get()["overdue_failed"] == rids
    assert _status(rt, rids[0]) == RequestStatus.FAILED
    with rt.session() as s:
        assert Ledger(s).balance(buyer) == 10**9
        hold = s.exec(select(LedgerHold).where(LedgerHold.request_ref == rids[0])).one()
        assert hold.state == HoldState.VOIDED and hold.expires_at is not None


def test_requests_with_different_limits_share_capacity_without_double_booking():
    """Buyers who refuse unverifiable nodes never get one; a tight input-price cap (what the
    hold covers) is honoured; one node's slot is never given twice across groups."""
    from scheduler.dispatch import route_in_groups
    from scheduler.routing import NodeState, PendingRequest, get_policy

    nodes = [NodeState(id="audited", model="m", price_in=10, price_out=10, tokens_per_s=50, region="us-east",
                       free_slots=1),
             NodeState(id="unverified", model="m", price_in=1, price_out=1, tokens_per_s=50, region="us-east",
                       free_slots=2, verifiable=False),
             NodeState(id="dear-in", model="m", price_in=10**6, price_out=5, tokens_per_s=50, region="us-east",
                       free_slots=5)]
    reqs = [PendingRequest(id="strict", model="m", prompt_tokens=10, max_tokens=10, max_price_in=100),
            PendingRequest(id="strict2", model="m", prompt_tokens=10, max_tokens=10, max_price_in=100),
            PendingRequest(id="open", model="m", prompt_tokens=10, max_tokens=10, allow_unverified=True)]
    d = route_in_groups(get_policy(None), reqs, nodes)
    assert d.assignments.get("strict") in (None, "audited") and d.assignments.get("strict2") in (None, "audited")
    assert list(d.assignments.values()).count("audited") <= 1
    assert "audited" in d.assignments.values()
    assert d.assignments["open"] in ("unverified", "dear-in", "audited")


def test_a_request_never_placed_whose_handler_died_is_released_within_a_minute(rt):
    """The API process that admitted it died: nobody waits for it any more. The sweep voids
    its hold once the handler's own assignment timeout (plus a grace) has passed."""
    from datetime import timedelta

    from sqlalchemy import update

    from coordinator.models import InferenceRequest
    from coordinator.models.account import utcnow
    from pricing.ledger import Ledger

    node_id = _node(rt)
    rids, buyer = _queue(rt, 1)
    with rt.session() as s:  # its only node went away before any dispatch: it stays queued
        s.get(Node, node_id).channel_connected = False
    assert tasks.sweep.apply().get()["overdue_failed"] == []
    with rt.session() as s:
        s.exec(update(InferenceRequest).values(created_at=utcnow() - timedelta(
            seconds=rt.settings.assign_timeout_s + 20)))
    assert tasks.sweep.apply().get()["overdue_failed"] == rids
    assert _status(rt, rids[0]) == RequestStatus.FAILED
    with rt.session() as s:
        assert Ledger(s).balance(buyer) == 10**9 and Ledger(s).held(buyer) == 0
    assert rt.settings.assign_timeout_s + 20 <= 60


def test_the_requests_of_a_dead_api_replica_are_ended_at_once(rt):
    """kill -9 of the API process serving some buyers: their handlers are gone. The sweep
    sees the replica stop beating and ends its requests: unplaced and running ones unpaid,
    receipts waiting for a delivery acknowledgement settled as undelivered."""
    from datetime import timedelta

    from coordinator import replicas
    from coordinator.models import ApiReplica
    from coordinator.settlement import Relayed, accept_receipt
    from protocol import Receipt, commitment_of

    node_id = _node(rt, concurrency=8)
    with rt.session() as s:
        replicas.beat(s, "api_dead")
        replicas.beat(s, rt.replica_id)
        acct, _ = create_account(s, "b", 10**9)
        body = ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4)
        mine = admit(s, acct, body, "chat", rt.settings, replica_id=rt.replica_id).request.id
        theirs = [admit(s, acct, body, "chat", rt.settings, replica_id="api_dead").request.id for _ in range(2)]
    tasks.dispatch.apply(kwargs={"window_ms": 0})
    ids, lps = [3, 4], [-10, -20]
    receipt = Receipt(node_id=node_id, **fresh_stamp(), request_id=theirs[1], model="tiny", prompt_tokens=3,
                      completion_tokens=2, commitment=commitment_of(theirs[1], ids, lps),
                      finish_reason="stop").sign(_IDENTITIES[node_id])
    with rt.session() as s:
        accept_receipt(s, receipt, node_id, Relayed(2, commitment_of(theirs[1], ids, lps)), rt.settings)
    assert tasks.sweep.apply().get()["overdue_failed"] == []  # it beat a moment ago
    with rt.session() as s:
        s.get(ApiReplica, "api_dead").last_seen = utcnow() - timedelta(seconds=60)
        s.get(ApiReplica, rt.replica_id).last_seen = utcnow()
    report = tasks.sweep.apply().get()
    assert report["overdue_failed"] == [theirs[0]] and report["unacked"] == [theirs[1]]
    assert _status(rt, theirs[0]) == RequestStatus.FAILED
    assert _status(rt, mine) in (RequestStatus.ASSIGNED, RequestStatus.QUEUED)  # a live replica's: untouched
    with rt.session() as s:
        assert s.get(ApiReplica, "api_dead") is None
        assert s.get(InferenceRequest, theirs[1]).delivery == "unacked"
