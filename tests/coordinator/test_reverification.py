"""A seller's appeal of a failed audit: judged again by verifiers that had no part in the
verdict; an overturn restores the node's record and money, at the wrong verifiers' cost."""

from __future__ import annotations

from coordinator.models import Audit, AuditStatus, Node
from protocol import ReverifyRequest, fresh_stamp
from pricing.ledger import AccountKind, Ledger, total_balance
from tests.coordinator.test_audits import _assign, _node, _served_and_audited, _state, _verdict
from tests.coordinator.test_node_identity import post


def _wrongly_failed(rt, *, prior_failures: int = 0):
    """An honest, staked node whose job two qualified verifiers (v1, v2) both fail: a
    confirmed verdict, so it is penalised (and, after `prior_failures` = 2, banned)."""
    honest = _node(rt, "honest", stake=10**9)
    v1, v2 = _node(rt, "v1", passes=5, stake=10**9), _node(rt, "v2", passes=5, stake=10**9)
    with rt.session() as s:
        s.get(Node, honest.public_key_hex).audits_failed = prior_failures
    audit, rid, buyer = _served_and_audited(rt, honest)
    by = {v.public_key_hex: v for v in (v1, v2)}
    _verdict(rt, audit.id, by[_assign(rt, audit.id)], honest=False)
    done = _verdict(rt, audit.id, by[_assign(rt, audit.id)], honest=False)
    assert done.status == AuditStatus.FAILED and done.consequences["slashed_nano_usd"] > 0
    return honest, (v1, v2), audit.id, buyer


def _appeal(client, node, audit_id: int, signer=None):
    return post(client, "/v1/nodes/me/audits/reverify",
                ReverifyRequest(node_id=node.public_key_hex, **fresh_stamp(), audit_id=audit_id).sign(signer or node))


def _money(rt, node) -> tuple[int, int]:
    with rt.session() as s:
        led = Ledger(s)
        stake = led.open_account(AccountKind.SELLER_STAKE, ref=f"node:{node.public_key_hex}").id
        return led.balance(s.get(Node, node.public_key_hex).earnings_account_id), led.balance(stake)


def test_an_appeal_a_trusted_verifier_upholds_moves_nothing(client, runtime):
    honest, _, audit_id, buyer = _wrongly_failed(runtime)
    ops = _node(runtime, "ops", trusted=True)
    before, state = _money(runtime, honest), _state(runtime, honest)
    r = _appeal(client, honest, audit_id)
    assert r.status_code == 200 and r.json()["status"] == "sent" and r.json()["verifier_id"] == ops.public_key_hex
    done = _verdict(runtime, audit_id, ops, honest=False)
    assert done.status == AuditStatus.FAILED and done.evidence["reverify"]["outcome"] == "upheld"
    assert (_money(runtime, honest), _state(runtime, honest)) == (before, state)
    again = _appeal(client, honest, audit_id)  # one appeal per audit
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_appealed"


def test_an_overturned_verdict_restores_the_node_and_costs_the_wrong_verifiers(client, runtime):
    honest, (v1, v2), audit_id, buyer = _wrongly_failed(runtime, prior_failures=2)
    assert _state(runtime, honest)[3] is True  # the third failure banned it
    with runtime.session() as s:
        took = s.get(Audit, audit_id).consequences
        buyer_after_refund = Ledger(s).balance(buyer)
    earnings, stake = _money(runtime, honest)
    ops = _node(runtime, "ops", trusted=True)
    assert _appeal(client, honest, audit_id).status_code == 200
    done = _verdict(runtime, audit_id, ops, honest=True)
    restored = done.evidence["reverify"]["restored"]
    assert done.status == AuditStatus.PASSED and done.evidence["reverify"]["outcome"] == "overturned"
    assert restored["ban_lifted"] and restored["compensated_nano_usd"] == \
        took["clawed_back_nano_usd"] + took["slashed_nano_usd"]
    assert _state(runtime, honest)[:2] == (1, 2) and _state(runtime, honest)[3] is False
    assert _money(runtime, honest) == (earnings + restored["compensated_nano_usd"], stake)
    with runtime.session() as s:
        for v in (v1, v2):  # both verifiers that failed an honest job pay for it
            n = s.get(Node, v.public_key_hex)
            assert n.verdicts_overturned == 1 and n.reputation < runtime.settings.verifier_min_reputation
        assert Ledger(s).balance(buyer) == buyer_after_refund  # the buyer keeps its refund
        assert total_balance(s) == 0


def test_an_ordinary_verifiers_pass_needs_a_second_independent_one(client, runtime):
    honest, (v1, v2), audit_id, _ = _wrongly_failed(runtime)
    v3 = _node(runtime, "v3", passes=5)
    assert _appeal(client, honest, audit_id).json()["verifier_id"] == v3.public_key_hex  # v1, v2 excluded
    half = _verdict(runtime, audit_id, v3, honest=True)
    assert half.status == AuditStatus.PENDING and _state(runtime, honest)[1] == 1  # not acquitted yet
    assert _assign(runtime, audit_id) is None  # nobody independent of v1, v2 and v3 is around
    v4 = _node(runtime, "v4", passes=5)
    assert _assign(runtime, audit_id) == v4.public_key_hex
    assert _verdict(runtime, audit_id, v4, honest=True).evidence["reverify"]["outcome"] == "overturned"
    assert _state(runtime, honest)[:2] == (1, 0)


def test_appeals_only_for_the_nodes_own_failed_audits_in_time(client, runtime):
    honest, (v1, _), audit_id, _ = _wrongly_failed(runtime)
    other = _node(runtime, "other")
    assert _appeal(client, other, audit_id).status_code == 404  # not its audit
    forged = _appeal(client, honest, audit_id, signer=other)  # another key speaking for the node
    assert forged.status_code == 401
    passed, _, _ = _served_and_audited(runtime, v1)
    assert _appeal(client, v1, passed.id).json()["error"]["code"] == "not_failed"
    runtime.settings.reverify_window_s = 0
    late = _appeal(client, honest, audit_id)
    assert late.status_code == 409 and late.json()["error"]["code"] == "appeal_window_closed"
