"""An audit backlog nobody can verify (a market of one operator) costs the sweep a query per
model, not a verifier search per audit; it is sent as soon as someone could verify it."""

from __future__ import annotations

from coordinator.audits import due_for_dispatch
from tests.coordinator.test_audits import _node, _served_and_audited


def test_a_backlog_only_its_own_operator_could_verify_is_not_retried(runtime):
    seller = _node(runtime, "solo")
    _node(runtime, "solo", passes=5)  # a qualified verifier, but of the same operator
    audits = [_served_and_audited(runtime, seller)[0].id for _ in range(5)]
    with runtime.session() as s:
        assert due_for_dispatch(s, runtime.settings) == []
    sent = []
    runtime.dispatch_audit = lambda aid: sent.append(aid) or False
    runtime.store.sweep()
    assert sent == []  # the sweep searched for no verifier
    _node(runtime, "newcomer")  # of another operator, but it has not earned the right to judge
    with runtime.session() as s:
        assert due_for_dispatch(s, runtime.settings) == []
    _node(runtime, "other", passes=5)
    with runtime.session() as s:
        assert [a.id for a in due_for_dispatch(s, runtime.settings)] == audits
    runtime.store.sweep()
    assert sent == audits
