"""A new request is placed in the transaction that admits it when nothing of its model waits
(no broker round trip before its first token); placements and rounds running at once — in
several API processes, Celery workers — never give a node more requests than it can take."""

from __future__ import annotations

import threading

import pytest

from coordinator.db import create_all, make_engine
from coordinator.models import InferenceRequest, Node, RequestStatus
from coordinator.runtime import Runtime
from coordinator.settings import CoordinatorSettings
from scheduler.routing import Decision
from tests.coordinator.test_audits import _node
from tests.coordinator.test_routability import _admit


def _status(rt, rid: str) -> tuple:
    with rt.session() as s:
        r = s.get(InferenceRequest, rid)
        return r.status, r.node_id


def test_a_node_is_never_given_more_than_it_can_take(runtime):
    node = _node(runtime, "seller")
    with runtime.session() as s:
        s.get(Node, node.public_key_hex).max_concurrency = 1
    a, b = _admit(runtime, 10**9, max_tokens=8), _admit(runtime, 10**9, max_tokens=8)
    # two rounds that each saw the node's one free slot
    assert runtime.store.apply(Decision(assignments={a.id: node.public_key_hex})).assigned == 1
    second = runtime.store.apply(Decision(assignments={b.id: node.public_key_hex}))
    assert (second.assigned, second.skipped) == (0, 1)
    assert _status(runtime, b.id) == (RequestStatus.QUEUED, None)  # a later round places it


@pytest.mark.postgres
def test_concurrent_rounds_on_postgresql_respect_capacity(tmp_path, pg_url):
    settings = CoordinatorSettings(home=tmp_path, database_url=pg_url, run_worker_in_process=False)
    engine = make_engine(pg_url)
    create_all(engine)
    rt = Runtime(settings, engine=engine)
    try:
        node = _node(rt, "seller")
        with rt.session() as s:
            s.get(Node, node.public_key_hex).max_concurrency = 2
        reqs = [_admit(rt, 10**9, max_tokens=8) for _ in range(8)]
        start = threading.Barrier(len(reqs))
        results = []

        def round_(rid):
            start.wait()
            results.append(rt.store.apply(Decision(assignments={rid: node.public_key_hex})).assigned)

        threads = [threading.Thread(target=round_, args=(r.id,)) for r in reqs]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        assert sum(results) == 2 and len(results) == 8
        with rt.session() as s:
            assigned = [s.get(InferenceRequest, r.id).status for r in reqs].count(RequestStatus.ASSIGNED)
        assert assigned == 2
    finally:
        rt.stop()


def test_a_request_is_placed_in_the_transaction_that_admits_it(runtime):
    from coordinator.placement import place_now

    node = _node(runtime, "seller")
    with runtime.session() as s:
        s.get(Node, node.public_key_hex).max_concurrency = 1
    first = _admit(runtime, 10**9, max_tokens=8)
    with runtime.session() as s:
        assert place_now(s, s.get(InferenceRequest, first.id), runtime.settings) == node.public_key_hex
    assert _status(runtime, first.id) == (RequestStatus.ASSIGNED, node.public_key_hex)
    with runtime.session() as s:  # locked prices, like a dispatch round's
        r = s.get(InferenceRequest, first.id)
        assert (r.price_in, r.price_out) == (100_000_000, 200_000_000) and r.assigned_at is not None
    second = _admit(runtime, 10**9, max_tokens=8)
    with runtime.session() as s:  # the node is full: it waits for a round
        assert place_now(s, s.get(InferenceRequest, second.id), runtime.settings) is None
    third = _admit(runtime, 10**9, max_tokens=8)
    with runtime.session() as s:
        s.get(Node, node.public_key_hex).max_concurrency = 5
    with runtime.session() as s:  # room again, but an older request waits: the queue goes first
        assert place_now(s, s.get(InferenceRequest, third.id), runtime.settings) is None
    assert _status(runtime, third.id)[0] == RequestStatus.QUEUED
