"""No audit-free path through a failover: each node's segment of a failed-over stream is
audited at its node's rate, rescored after the earlier segments, and a failed one costs the
buyer nothing — voided before the request is paid, refunded after — while the other nodes'
segments stand."""

from __future__ import annotations

import pytest

from coordinator.audits import assign_verifier, maybe_select
from coordinator.delivery import Delivery, acknowledge
from coordinator.failover import fail_over
from coordinator.models import Audit, AuditStatus, InferenceRequest, Node, RequestStatus
from coordinator.settlement import Relayed, accept_receipt, settle, settle_accepted
from coordinator.verdicts import apply_result
from node_agent.identity import Identity
from protocol import VerifyResult, commitment_of
from pricing.ledger import AccountKind, Ledger, total_balance
from pricing.money import fee_of, request_cost
from pricing.stake import Stake
from scheduler.routing import Decision
from tests.coordinator.test_audits import _node
from tests.coordinator.test_settlement import CREDIT, PRICE_IN, PRICE_OUT, _receipt, _request

A_IDS, A_LPS = [5, 6, 7, 8], [-1000, -2000, -1500, -500]  # the first node's segment (it then stalls)
B_IDS, B_LPS = [14, 15], [-700, -300]  # the node that finished the stream
COST_A = request_cost(7, len(A_IDS), PRICE_IN, PRICE_OUT)  # the prompt is charged with the first segment
COST_B = request_cost(0, len(B_IDS), PRICE_IN, PRICE_OUT)


def _reply(audit: Audit, honest: bool) -> VerifyResult:
    """What a verifier sends back: the arrays for every token it was given (the earlier
    segments, then the audited one), honest or showing the audited part was not the model's."""
    ids = list(audit.claimed["prefix_ids"]) + list(audit.claimed["ids"])
    lps = [q / 10_000 for q in list(A_LPS + B_LPS)[:len(ids)]]
    own = len(audit.claimed["ids"])
    ref = lps if honest else lps[:-own] + [-9.0] * own
    top1 = ids if honest else ids[:-own] + [1] * own
    return VerifyResult(audit_id=audit.id, rescore={
        "logprob": ref, "top1_id": top1, "top1_logprob": lps if honest else lps[:-own] + [-0.1] * own,
        "admissible": [True] * (len(ids) - own) + [honest] * own, "expected_logprob": lps,
        "var_logprob": [0.0] * len(ids), "meta": {"eos_ids": [2]}})


def _judge(rt, audit_id: int, verifier: Identity, honest: bool) -> Audit:
    with rt.session() as s:
        target = assign_verifier(s, s.get(Audit, audit_id), rt.settings)
        assert target and target[0] == verifier.public_key_hex
        audit = s.get(Audit, audit_id)
        assert target[1]["claimed_ids"] == audit.claimed["prefix_ids"] + audit.claimed["ids"]
    with rt.session() as s:
        return apply_result(s, _reply(s.get(Audit, audit_id), honest), verifier.public_key_hex, rt.settings)


@pytest.fixture
def market(runtime):
    """A cheater `a` (staked), an honest `b`, the operator's trusted verifier; a request that
    ran on `a`, which stalled after 4 tokens (its segment picked for an audit: `a` is new)."""
    a, b, ops = _node(runtime, "a", stake=10**9), _node(runtime, "b"), _node(runtime, "ops", trusted=True)
    rid, buyer = _request(runtime, a, max_tokens=len(A_IDS) + len(B_IDS))
    with runtime.session() as s:
        moved = fail_over(s, rid, a.public_key_hex, A_IDS, logprobs=A_LPS, reason="no token for 30s",
                          settings=runtime.settings)
        assert moved and moved.audit_id is not None
        audit = s.get(Audit, moved.audit_id)
        assert (audit.segment, audit.node_id, audit.claimed["prefix_ids"]) == (0, a.public_key_hex, [])
    assert runtime.store.apply(Decision(assignments={rid: b.public_key_hex})).assigned == 1
    return runtime, a, b, ops, rid, buyer, moved.audit_id


def _finish_on_b(rt, b: Identity, rid: str, *, pay: bool) -> int:
    """`b` finishes the stream; its own segment (the last) is kept for an audit too."""
    with rt.session() as s:
        receipt, relayed = _receipt(b, rid, B_IDS, B_LPS), Relayed(2, commitment_of(rid, B_IDS, B_LPS))
        (settle if pay else accept_receipt)(s, receipt, b.public_key_hex, relayed, rt.settings)
        audit = maybe_select(s, s.get(InferenceRequest, rid), s.get(Node, b.public_key_hex), B_IDS, B_LPS, "length",
                             rt.settings, u=0.0, prompt_tokens=7 + len(A_IDS))
        assert (audit.segment, audit.claimed["prefix_ids"]) == (1, A_IDS)
        return audit.id


def _money(rt, buyer: int, *nodes: Identity) -> tuple:
    with rt.session() as s:
        led = Ledger(s)
        return (led.balance(buyer), *(led.balance(s.get(Node, n.public_key_hex).earnings_account_id) for n in nodes),
                total_balance(s))


def test_a_cheated_segment_judged_before_payment_is_never_charged(market):
    rt, a, b, ops, rid, buyer, seg_audit = market
    done = _judge(rt, seg_audit, ops, honest=False)
    assert done.status == AuditStatus.FAILED and "unlikely_tokens" in done.verdict["reasons"]
    assert done.consequences["segment"] == 0 and done.consequences["slashed_nano_usd"] > 0
    assert done.consequences["refunded_nano_usd"] == 0  # nothing was charged for it yet
    b_audit = _finish_on_b(rt, b, rid, pay=True)
    assert _judge(rt, b_audit, ops, honest=True).status == AuditStatus.PASSED  # only b's own tokens judged
    with rt.session() as s:
        assert s.get(InferenceRequest, rid).cost == COST_B  # the cheated segment (and its prompt) is free
    assert _money(rt, buyer, a, b) == (CREDIT - COST_B, 0, COST_B - fee_of(COST_B, rt.settings.platform_fee_bps), 0)


def test_a_cheated_segment_judged_after_payment_is_refunded_alone(market):
    rt, a, b, ops, rid, buyer, seg_audit = market
    b_audit = _finish_on_b(rt, b, rid, pay=True)
    assert _money(rt, buyer, a, b)[0] == CREDIT - COST_A - COST_B
    done = _judge(rt, seg_audit, ops, honest=False)
    assert done.status == AuditStatus.FAILED and done.consequences["buyer_made_whole"]
    assert done.consequences["refunded_nano_usd"] == COST_A
    assert _judge(rt, b_audit, ops, honest=True).status == AuditStatus.PASSED
    fee = rt.settings.platform_fee_bps
    assert _money(rt, buyer, a, b) == (CREDIT - COST_B, 0, COST_B - fee_of(COST_B, fee), 0)
    with rt.session() as s:  # the slash came from a's stake, sized to deter at a's audit rate
        stake = Ledger(s).open_account(AccountKind.SELLER_STAKE, ref=f"node:{a.public_key_hex}").id
        assert Ledger(s).balance(stake) < 10**9 - fee_of(COST_A, fee)


def test_the_last_segment_failing_before_payment_voids_only_that_segment(market):
    rt, a, b, ops, rid, buyer, seg_audit = market
    assert _judge(rt, seg_audit, ops, honest=True).status == AuditStatus.PASSED
    with rt.session() as s:  # b is staked too: a failed audit slashes
        led = Ledger(s)
        Stake(led).deposit(led.open_account(AccountKind.SELLER_STAKE, ref=f"node:{b.public_key_hex}").id, 10**9,
                           idempotency_key="stake-b")
    b_audit = _finish_on_b(rt, b, rid, pay=False)  # receipt in, buyer's delivery not acknowledged yet
    done = _judge(rt, b_audit, ops, honest=False)
    assert done.status == AuditStatus.FAILED and done.consequences["segment"] == 1
    with rt.session() as s:
        assert s.get(InferenceRequest, rid).status == RequestStatus.SETTLING
        acknowledge(s, rid, len(A_IDS) + len(B_IDS), Delivery.COMPLETE)
        settled = settle_accepted(s, rid, rt.settings)
    assert settled.cost == COST_A
    fee = rt.settings.platform_fee_bps
    assert _money(rt, buyer, a, b) == (CREDIT - COST_A, COST_A - fee_of(COST_A, fee), 0, 0)


def test_a_continuation_from_text_is_not_audited(runtime):
    a, b = _node(runtime, "a"), _node(runtime, "b")
    rid, _ = _request(runtime, a, max_tokens=8)
    with runtime.session() as s:  # a's engine named no token ids: b continues from text
        moved = fail_over(s, rid, a.public_key_hex, None, count=3, text="abc", settings=runtime.settings)
        assert moved and moved.audit_id is None
    assert runtime.store.apply(Decision(assignments={rid: b.public_key_hex})).assigned == 1
    with runtime.session() as s:
        assert maybe_select(s, s.get(InferenceRequest, rid), s.get(Node, b.public_key_hex), B_IDS, B_LPS, "length",
                            runtime.settings, u=0.0) is None
