"""Liveness on the work channel: a beat is answered at once and costs no signature, no nonce
row and no database write of its own; what the channel heard is written in batches."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func
from sqlmodel import select

from coordinator.app import _flush_once
from coordinator.liveness import Liveness
from coordinator.models import Node, NodeNonce
from coordinator.models.account import utcnow
from protocol import ChannelHello, fresh_stamp
from tests.coordinator.test_routability import _seller


def _nonces(rt) -> int:
    with rt.session() as s:
        return s.exec(select(func.count()).select_from(NodeNonce)).one()


def _set_silent(rt, node_id: str) -> None:
    with rt.session() as s:
        s.get(Node, node_id).last_heartbeat_at = utcnow() - timedelta(minutes=5)


def test_a_beat_is_acked_and_written_in_the_next_batch(client, runtime):
    me = _seller(client, runtime, connected=False)
    with client.websocket_connect("/v1/nodes/channel") as ws:
        ws.send_json(ChannelHello(node_id=me.public_key_hex, **fresh_stamp()).sign(me).model_dump(mode="json"))
        assert ws.receive_json()["type"] == "welcome"
        _set_silent(runtime, me.public_key_hex)
        nonces = _nonces(runtime)
        ws.send_json({"type": "beat", "t": 12.5})
        while (frame := ws.receive_json())["type"] == "ping":
            pass
        assert frame == {"type": "beat_ack", "t": 12.5}
        assert _nonces(runtime) == nonces  # no signature, no nonce row
        with runtime.session() as s:  # not written yet: the batch is
            assert s.get(Node, me.public_key_hex).last_heartbeat_at < utcnow() - timedelta(minutes=4)
        _flush_once(runtime)
        with runtime.session() as s:
            assert s.get(Node, me.public_key_hex).last_heartbeat_at > utcnow() - timedelta(seconds=5)


def test_only_beats_that_ask_are_acked_and_every_beat_counts(client, runtime):
    me = _seller(client, runtime, connected=False)
    with client.websocket_connect("/v1/nodes/channel") as ws:
        ws.send_json(ChannelHello(node_id=me.public_key_hex, **fresh_stamp()).sign(me).model_dump(mode="json"))
        assert ws.receive_json()["type"] == "welcome"
        _set_silent(runtime, me.public_key_hex)
        ws.send_json({"type": "beat", "t": 1.0, "ack": False})  # noted, not answered
        ws.send_json({"type": "beat", "t": 2.0, "ack": True})
        ws.send_json({"type": "beat", "t": "forged", "ack": True})  # answered, but its t is not echoed
        frames = []
        while len(frames) < 2:
            frame = ws.receive_json()
            if frame["type"] != "ping":
                frames.append(frame)
        assert frames == [{"type": "beat_ack", "t": 2.0}, {"type": "beat_ack", "t": None}]
        _flush_once(runtime)
        with runtime.session() as s:
            assert s.get(Node, me.public_key_hex).last_heartbeat_at > utcnow() - timedelta(seconds=5)


def test_a_flush_writes_every_node_heard_once_and_keeps_what_fails(runtime, client):
    ids = [_seller(client, runtime).public_key_hex for _ in range(3)]
    with runtime.session() as s:
        s.get(Node, ids[2]).banned = True
    for nid in ids:
        _set_silent(runtime, nid)
    book = Liveness()
    for _ in range(50):  # many beats: one row update each at the flush
        for nid in ids:
            book.heard(nid)
    book.heard(ids[0], rtt_ms=40.0)
    with runtime.session() as s:
        assert book.flush(s) == 3 and book.pending() == 0
    with runtime.session() as s:
        fresh = [s.get(Node, n).last_heartbeat_at > utcnow() - timedelta(seconds=5) for n in ids]
        assert fresh == [True, True, False]  # a banned node is not brought back
        assert s.get(Node, ids[0]).rtt_ms == pytest.approx(40.0)
    book.heard(ids[1])

    class Broken:
        def exec(self, *a, **kw):
            raise RuntimeError("database gone")

    with pytest.raises(RuntimeError):
        book.flush(Broken())
    assert book.pending() == 1  # kept for the next flush


def test_streams_that_started_are_marked_running_in_one_batch(runtime, client):
    from coordinator.models import InferenceRequest, RequestStatus
    from tests.coordinator.test_routability import _admit

    node = _seller(client, runtime)
    reqs = [_admit(runtime, 10**9, max_tokens=8) for _ in range(3)]
    with runtime.session() as s:
        for r in reqs[:2]:
            row = s.get(InferenceRequest, r.id)
            row.status, row.node_id = RequestStatus.ASSIGNED, node.public_key_hex
        s.get(InferenceRequest, reqs[2].id).status = RequestStatus.SETTLING  # finished before the flush
    book = Liveness()
    for r in reqs:
        book.started(r.id)
    with runtime.session() as s:
        book.flush(s)
    with runtime.session() as s:
        rows = [s.get(InferenceRequest, r.id) for r in reqs]
        assert [r.status for r in rows] == [RequestStatus.RUNNING, RequestStatus.RUNNING, RequestStatus.SETTLING]
        # a stream that finished before the flush keeps its status and still gets its first
        # token's time (its TTFT is in the history and the buyer's usage)
        assert all(r.first_token_at is not None for r in rows)


@pytest.mark.postgres
def test_a_flush_on_postgresql(tmp_path, pg_url):
    from coordinator.db import create_all, make_engine
    from coordinator.models import InferenceRequest, RequestStatus
    from coordinator.runtime import Runtime
    from coordinator.settings import CoordinatorSettings
    from tests.coordinator.test_audits import _node
    from tests.coordinator.test_routability import _admit

    engine = make_engine(pg_url)
    create_all(engine)
    rt = Runtime(CoordinatorSettings(home=tmp_path, database_url=pg_url, run_worker_in_process=False), engine=engine)
    try:
        node = _node(rt, "seller").public_key_hex
        req = _admit(rt, 10**9, max_tokens=8)
        _set_silent(rt, node)
        with rt.session() as s:
            row = s.get(InferenceRequest, req.id)
            row.status, row.node_id = RequestStatus.ASSIGNED, node
        book = Liveness()
        book.heard(node, rtt_ms=12.0)
        book.started(req.id)
        with rt.session() as s:
            assert book.flush(s) == 1
        with rt.session() as s:
            n = s.get(Node, node)
            assert n.last_heartbeat_at > utcnow() - timedelta(seconds=5) and n.rtt_ms == pytest.approx(12.0)
            assert s.get(InferenceRequest, req.id).status == RequestStatus.RUNNING
    finally:
        rt.stop()


def test_a_beats_prefix_report_updates_cache_affinity(client, runtime):
    """A node's beat withdraws the prefixes its cache evicted (and a malformed report is
    ignored without dropping the channel)."""
    from coordinator.affinity import prefix_chain
    if runtime.affinity is None:
        pytest.skip("cache-aware routing is off in this runtime")
    me = _seller(client, runtime, connected=False)
    nid = me.public_key_hex
    kept = prefix_chain("tiny", {"messages": [{"role": "user", "content": "kept"}]})
    evicted = prefix_chain("tiny", {"messages": [{"role": "user", "content": "evicted"}]})
    runtime.affinity.record(kept, nid)
    runtime.affinity.record(evicted, nid)
    with client.websocket_connect("/v1/nodes/channel") as ws:
        ws.send_json(ChannelHello(node_id=nid, **fresh_stamp()).sign(me).model_dump(mode="json"))
        assert ws.receive_json()["type"] == "welcome"
        ws.send_json({"type": "beat", "t": 1.0, "prefix_add": "zz-not-a-list", "ack": True})
        ws.send_json({"type": "beat", "t": 2.0, "prefix_drop": [evicted[-1][0].hex()], "ack": True})
        acks = 0
        while acks < 2:
            acks += ws.receive_json()["type"] == "beat_ack"
    assert runtime.affinity.lookup(kept) == ((nid, kept[-1][1]),)
    assert runtime.affinity.lookup(evicted) == ()
