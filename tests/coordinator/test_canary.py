"""Canaries: the coordinator's own test purchases, assigned straight to each due node at
its price, funded from outside the market, and always audited."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from coordinator.audits import maybe_select
from coordinator.canary import CANARY_MAX_TOKENS, send_canaries
from coordinator.models import InferenceRequest, Node, RequestStatus
from coordinator.models.account import utcnow
from pricing.ledger import total_balance
from tests.coordinator.test_audits import _node


def test_due_nodes_get_one_canary_each_then_wait_for_the_interval(runtime):
    runtime.settings.canary_interval_s = 60
    a, b = _node(runtime, "x"), _node(runtime, "y")
    assert send_canaries(runtime) == []  # just registered: not due yet
    with runtime.session() as s:
        s.exec(update(Node).values(registered_at=utcnow() - timedelta(seconds=120)))
    sent = send_canaries(runtime)
    assert len(sent) == 2 and send_canaries(runtime) == []
    with runtime.session() as s:
        reqs = [s.get(InferenceRequest, rid) for rid in sent]
        assert {r.node_id for r in reqs} == {a.public_key_hex, b.public_key_hex}
        for r in reqs:
            assert r.status == RequestStatus.ASSIGNED and r.price_out == 200_000_000 and r.hold_id
            assert 1 <= r.max_tokens <= CANARY_MAX_TOKENS and r.kind in ("chat", "completion")
            node = s.get(Node, r.node_id)
            assert maybe_select(s, r, node, [1, 2], [-1, -2], "length", runtime.settings, u=0.999) is not None
        assert total_balance(s) == 0


def test_canaries_can_be_switched_off(runtime):
    runtime.settings.canary_interval_s = 0
    _node(runtime, "x")
    with runtime.session() as s:
        s.exec(update(Node).values(registered_at=utcnow() - timedelta(days=1)))
    assert send_canaries(runtime) == []


def test_canaries_look_like_buyers_jobs_to_the_node():
    """What a node sees of a canary (its assignment frame) has the same fields and the same
    spread of kinds, languages, lengths, sampling and max_tokens as buyers' requests: no fixed
    word list, no fixed temperature or length to recognise it by."""
    import random

    from coordinator.canary import canary_request

    rng = random.Random(7)
    draws = [canary_request(4096, rng) for _ in range(600)]
    kinds = {d["kind"] for d in draws}
    temps = {d["sampling"]["temperature"] for d in draws}
    lengths = sorted(d["prompt_bytes"] for d in draws)
    max_tokens = {d["sampling"]["max_tokens"] for d in draws}
    texts = {(d.get("prompt") or d["messages"][0]["content"]) for d in draws}
    assert kinds == {"chat", "completion"} and len(temps) >= 3 and 0.0 in temps
    assert lengths[0] < 100 and lengths[-1] > 1000 and len(max_tokens) >= 5
    assert len(texts) >= 0.99 * len(draws)  # hardly ever the same prompt twice
    assert any(not t.isascii() for t in texts)  # several languages
