"""Nodes' job counters written off the receipt's transaction (`coordinator/job_counts.py`):
exact once written, coalesced into one UPDATE per node, counted toward `session_jobs` only
in the channel session the job was done in, and never counted before its receipt commits."""

from __future__ import annotations

import threading

from sqlalchemy import event

from coordinator.models import Node
from tests.coordinator.test_settlement import _node


def _counts(rt, node_id):
    with rt.session() as s:
        n = s.get(Node, node_id)
        return n.jobs, n.session_jobs


def test_counts_arriving_together_are_written_in_one_update_per_node(runtime, monkeypatch):
    a, b = _node(runtime).public_key_hex, _node(runtime).public_key_hex
    with runtime.session() as s:
        for nid in (a, b):
            s.get(Node, nid).channel_id = "ch1"
    updates = []
    event.listen(runtime.engine, "before_cursor_execute",
                 lambda c, cur, stmt, *args: updates.append(stmt) if stmt.startswith("UPDATE nodes") else None)
    hold = threading.Event()
    real = runtime.job_counts._write
    monkeypatch.setattr(runtime.job_counts, "_write", lambda batch: (hold.wait(5), real(batch)))
    runtime.job_counts.add(a, "ch1")  # its write waits: the rest arrive meanwhile
    for _ in range(40):
        runtime.job_counts.add(a, "ch1")
        runtime.job_counts.add(b, "ch1")
    hold.set()
    assert runtime.job_counts.flush(10)
    assert _counts(runtime, a) == (41, 41) and _counts(runtime, b) == (40, 40)
    assert len(updates) == 3  # a alone, then a and b once each


def test_a_job_of_an_earlier_channel_session_does_not_count_toward_the_new_session(runtime):
    nid = _node(runtime).public_key_hex
    with runtime.session() as s:
        n = s.get(Node, nid)
        n.channel_id, n.jobs, n.session_jobs = "new", 100, 0  # reconnected: session_jobs reset
    runtime.job_counts.add(nid, "old")  # a receipt of the old channel, counted late
    runtime.job_counts.add(nid, "new")
    assert runtime.job_counts.flush(10)
    assert _counts(runtime, nid) == (102, 1)  # both are jobs; one belongs to this session


def test_a_stored_receipt_counts_one_job_after_its_commit_and_a_resent_one_none(runtime):
    from protocol import Done, commitment_of

    from coordinator.settlement import Relayed
    from coordinator.work_channel import Channel, _Stream
    from tests.coordinator.test_settlement import _receipt, _request

    node = _node(runtime)
    ch = Channel(None, runtime)
    ch.node_id = node.public_key_hex
    with runtime.session() as s:
        s.get(Node, ch.node_id).channel_id = ch.channel_id
    before = _counts(runtime, ch.node_id)
    ids, lps = [5, 6, 7], [-1, -2, -3]
    rid, _ = _request(runtime, node, max_tokens=4)
    for resend in (False, True):
        st = _Stream(rid)
        st.token_ids, st.logprobs = ids, lps
        done = Done(request_id=rid, receipt=_receipt(node, rid, ids, lps))
        accepted = ch._accept(done, Relayed(3, commitment_of(rid, ids, lps)), st)
        assert accepted.fresh is not resend
    assert runtime.job_counts.flush(10)
    assert _counts(runtime, ch.node_id) == (before[0] + 1, before[1] + 1)
