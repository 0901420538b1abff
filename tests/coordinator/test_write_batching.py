"""What a loaded embedded coordinator writes less often, and must still write exactly:
request endings in batches (`endings.py`) and SQLite writers in arrival order
(`db.WriterTurns`)."""

from __future__ import annotations

import threading
import time

from sqlalchemy import func
from sqlmodel import select

from coordinator.db import WriterTurns
from coordinator.delivery import Delivery
from coordinator.endings import Ending
from coordinator.models import InferenceRequest, RequestStatus
from coordinator.settlement import Relayed, accept_receipt
from protocol import commitment_of
from pricing.ledger import total_balance
from tests.coordinator.test_settlement import CREDIT, _node, _receipt, _request
from coordinator.account_service import create_account
from coordinator.admission import admit
from coordinator.schemas import ChatCompletionRequest


def test_writers_get_the_lock_in_arrival_order_and_a_waiter_can_give_up():
    turns = WriterTurns()
    assert turns.acquire(1)
    order, threads = [], []
    for i in range(4):
        def wait(i=i):
            assert turns.acquire(5)
            order.append(i)
            turns.release()
        t = threading.Thread(target=wait)
        t.start()
        threads.append(t)
        time.sleep(0.05)  # queued in this order
    assert not turns.acquire(0.05)  # held, and four wait before it: it gives up
    turns.release()
    for t in threads:
        t.join(5)
    assert order == [0, 1, 2, 3]
    assert turns.acquire(0.05)  # nobody holds it any more


def test_writers_that_end_requests_take_the_turn_before_queued_admissions():
    turns = WriterTurns()
    assert turns.acquire(1)
    order, threads = [], []

    def wait(name, first):
        assert turns.acquire(5, first=first)
        order.append(name)
        turns.release()

    for name, first in (("admit-1", False), ("admit-2", False), ("receipt", True), ("admit-3", False), ("ending", True)):
        t = threading.Thread(target=wait, args=(name, first))
        t.start()
        threads.append(t)
        time.sleep(0.05)  # queued in this order
    assert not turns.acquire(0.05, first=True)  # a waiter that gives up leaves the queue
    turns.release()
    for t in threads:
        t.join(5)
    assert order == ["receipt", "ending", "admit-1", "admit-2", "admit-3"]


def test_writes_first_marks_only_the_transactions_begun_inside_it(tmp_path, monkeypatch):
    from coordinator import db

    engine = db.make_engine(f"sqlite:///{tmp_path / 'f.db'}")
    seen = []
    real = db.WriterTurns.acquire
    monkeypatch.setattr(db.WriterTurns, "acquire", lambda self, t, first=False: (seen.append(first), real(self, t, first))[1])
    for inside in (True, False):
        if inside:
            with db.writes_first(), db.session_scope(engine) as s:
                s.connection()
        else:
            with db.session_scope(engine) as s:
                s.connection()
    assert seen == [True, False]


def test_concurrent_writers_of_one_sqlite_engine_all_commit(runtime):
    _node(runtime)
    errors = []

    def one():
        try:
            with runtime.session() as s:  # an account, a deposit, an admission with its hold
                account, _ = create_account(s, "buyer", CREDIT)
                admit(s, account, ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                        max_tokens=4), "chat", runtime.settings)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    with runtime.session() as s:
        assert total_balance(s) == 0
        assert s.exec(select(func.count()).select_from(InferenceRequest)).one() == 12


def test_endings_arriving_together_are_written_together_and_each_counts(runtime, monkeypatch):
    from scheduler.tasks import settle

    sent = []
    monkeypatch.setattr(settle, "apply_async", lambda args, **kw: sent.append(args[0]))
    node = _node(runtime)
    rids = []
    for _ in range(6):
        rid, _ = _request(runtime, node, max_tokens=4)
        ids, lps = [5, 6, 7], [-1, -2, -3]
        with runtime.session() as s:
            accept_receipt(s, _receipt(node, rid, ids, lps), node.public_key_hex,
                           Relayed(3, commitment_of(rid, ids, lps)), runtime.settings)
        rids.append(rid)
    commits = []
    from sqlalchemy import event
    event.listen(runtime.engine, "commit", lambda conn: commits.append(1))
    hold = threading.Event()
    real = runtime.endings._write
    monkeypatch.setattr(runtime.endings, "_write", lambda batch, ok: (hold.wait(5), real(batch, ok)))
    written = [runtime.endings.add(Ending(rids[0], 3, Delivery.COMPLETE))]  # its write waits for the others
    for rid in rids[1:]:
        written.append(runtime.endings.add(Ending(rid, 2, Delivery.BUYER_GONE)))
    written.append(runtime.endings.add(Ending("req_unknown", 1, Delivery.COMPLETE)))  # a bad one holds back nobody
    time.sleep(0.1)
    assert not any(w.done() for w in written)  # nothing is said to be written before it is
    hold.set()
    assert [w.result(10) for w in written] == [True] * 7
    deadline = time.monotonic() + 10
    while (runtime.endings.pending() or runtime.endings._running) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(commits) == 2  # the first ending alone, then the other six in one transaction
    with runtime.session() as s:
        got = {r: (s.get(InferenceRequest, r).delivery, s.get(InferenceRequest, r).delivered_tokens) for r in rids}
        assert all(s.get(InferenceRequest, r).status == RequestStatus.SETTLING for r in rids)
    assert got[rids[0]] == (Delivery.COMPLETE.value, 3)
    assert all(got[r] == (Delivery.BUYER_GONE.value, 2) for r in rids[1:])
    assert sent == [rids[0]]  # one settle task stands for all of them


def test_an_ending_that_could_not_be_written_is_not_said_to_be(runtime, monkeypatch):
    from coordinator import endings

    node = _node(runtime)
    rid, _ = _request(runtime, node, max_tokens=4)
    real = endings._record

    def record(s, e):
        if e.request_id == "req_bad":
            raise RuntimeError("the database refused it")
        return real(s, e)

    def record_all(s, batch):  # the batch write fails as a whole: each ending is then tried alone
        raise RuntimeError("one of them is bad")

    monkeypatch.setattr(endings, "_record", record)
    monkeypatch.setattr(endings, "_record_all", record_all)
    hold = threading.Event()
    real_write = runtime.endings._write
    monkeypatch.setattr(runtime.endings, "_write", lambda batch, ok: (hold.wait(5), real_write(batch, ok)))
    first = runtime.endings.add(Ending("req_unknown", 1, Delivery.COMPLETE))
    bad = runtime.endings.add(Ending("req_bad", 1, Delivery.COMPLETE))
    good = runtime.endings.add(Ending(rid, 2, Delivery.BUYER_GONE))
    hold.set()
    assert (first.result(10), bad.result(10), good.result(10)) == (True, False, True)  # the bad one: the sweep's
    with runtime.session() as s:
        assert (s.get(InferenceRequest, rid).delivery, s.get(InferenceRequest, rid).delivered_tokens) == \
            (Delivery.BUYER_GONE.value, 2)


def test_a_buyer_gone_while_waiting_for_its_ending_stops_no_other_ending(runtime, monkeypatch):
    # The usage chunk waits on the ending's future (endings.acknowledged); a buyer who hangs up
    # then, or the wait's timeout, cancels that wait. The writer must still write that ending
    # and every later one.
    import asyncio

    from coordinator.endings import acknowledged

    node = _node(runtime)
    rids = [_request(runtime, node, max_tokens=4)[0] for _ in range(2)]
    hold = threading.Event()
    real = runtime.endings._write
    monkeypatch.setattr(runtime.endings, "_write", lambda batch, ok: (hold.wait(5), real(batch, ok)))
    first = runtime.endings.add(Ending(rids[0], 3, Delivery.COMPLETE))

    async def impatient():
        await acknowledged(first, timeout_s=0.1)  # gives up while the write is held

    asyncio.run(impatient())
    hold.set()
    assert first.result(10) is True  # written all the same
    assert runtime.endings.add(Ending(rids[1], 2, Delivery.BUYER_GONE)).result(10) is True
    with runtime.session() as s:
        assert [s.get(InferenceRequest, r).delivery for r in rids] == [Delivery.COMPLETE.value,
                                                                       Delivery.BUYER_GONE.value]
