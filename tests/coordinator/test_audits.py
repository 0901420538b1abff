"""Audits on the coordinator: who verifies, what a verdict does to money and reputation."""

from __future__ import annotations

import pytest

from coordinator.audits import apply_result, assign_verifier, maybe_select
from coordinator.models import Account, Audit, AuditStatus, InferenceRequest, Node
from coordinator.settlement import Relayed, settle
from node_agent.identity import Identity
from protocol import ModelOffer, Registration, VerifyResult, commitment_of, fresh_stamp
from pricing.ledger import AccountKind, Ledger, total_balance
from pricing.stake import Stake
from tests.coordinator.test_settlement import _receipt, _request
from coordinator.node_registry import register

IDS, LPS = [5, 6, 7, 8], [-1000, -2000, -1500, -500]


def _node(rt, operator: str) -> Identity:
    me = Identity.generate()
    reg = Registration(node_id=me.public_key_hex, **fresh_stamp(), region="us-east", max_concurrency=4,
                       operator=operator, models=[ModelOffer(model="tiny", price_in=100_000_000,
                                                             price_out=200_000_000, tokens_per_s=100.0)]).sign(me)
    with rt.session() as s:
        register(s, reg, rt.settings).channel_connected = True
    return me


def _served_and_audited(rt, node: Identity) -> tuple[Audit, str, int]:
    rid, buyer = _request(rt, node, max_tokens=len(IDS))
    with rt.session() as s:
        settle(s, _receipt(node, rid, IDS, LPS), node.public_key_hex, Relayed(4, commitment_of(rid, IDS, LPS)),
               rt.settings)
        req, n = s.get(InferenceRequest, rid), s.get(Node, node.public_key_hex)
        audit = maybe_select(s, req, n, IDS, LPS, "length", u=0.0)
    return audit, rid, buyer


def _reply(audit_id: int, honest: bool) -> VerifyResult:
    ref = [q / 10_000 for q in LPS] if honest else [-9.0] * 4
    return VerifyResult(audit_id=audit_id, rescore={
        "logprob": ref, "top1_id": IDS if honest else [1, 1, 1, 1], "top1_logprob": ref if honest else [-0.1] * 4,
        "admissible": [honest] * 4, "expected_logprob": ref if honest else [-0.1] * 4, "var_logprob": [0.0] * 4,
        "meta": {"eos_ids": [2]}})


def test_verifier_is_never_the_node_or_its_operator(runtime):
    a, a2 = _node(runtime, "acme"), _node(runtime, "acme")
    audit, _, _ = _served_and_audited(runtime, a)
    with runtime.session() as s:
        assert assign_verifier(s, s.get(Audit, audit.id), runtime.settings) is None  # only acme's nodes
    b = _node(runtime, "other")
    with runtime.session() as s:
        verifier, frame = assign_verifier(s, s.get(Audit, audit.id), runtime.settings)
    assert verifier == b.public_key_hex and frame["claimed_ids"] == IDS and frame["type"] == "verify"
    _ = a2


def test_established_nodes_are_audited_at_a_low_rate_and_failovers_not_at_all(runtime):
    node = _node(runtime, "x")
    rid, _ = _request(runtime, node)
    with runtime.session() as s:
        req, n = s.get(InferenceRequest, rid), s.get(Node, node.public_key_hex)
        n.jobs, n.audits_passed = 500, 400
        assert maybe_select(s, req, n, IDS, LPS, "length", u=0.5) is None  # rate ~ 0.05 now
        assert maybe_select(s, req, n, IDS, LPS, "length", u=0.01) is not None
        req.payload = {**req.payload, "segments": [{"node_id": "z"}]}
        assert maybe_select(s, req, n, IDS, LPS, "length", u=0.0) is None


def test_pass_raises_reputation_and_pays_the_verifier(runtime):
    node, verifier = _node(runtime, "a"), _node(runtime, "b")
    audit, _, _ = _served_and_audited(runtime, node)
    with runtime.session() as s:
        assign_verifier(s, s.get(Audit, audit.id), runtime.settings)
    with runtime.session() as s:
        assert apply_result(s, _reply(audit.id, True), node.public_key_hex, runtime.settings) is None  # not its verifier
        done = apply_result(s, _reply(audit.id, True), verifier.public_key_hex, runtime.settings)
        assert done.status == AuditStatus.PASSED, done.verdict
        assert s.get(Node, node.public_key_hex).reputation > 0.5
        assert done.consequences["verifier_paid_nano_usd"] > 0
        assert Ledger(s).balance(s.get(Node, verifier.public_key_hex).earnings_account_id) > 0
        assert total_balance(s) == 0


def test_failures_refund_the_buyer_slash_stake_and_ban_on_the_third(runtime):
    node, verifier = _node(runtime, "a"), _node(runtime, "b")
    with runtime.session() as s:
        led = Ledger(s)
        stake_id = led.open_account(AccountKind.SELLER_STAKE, ref=f"node:{node.public_key_hex}").id
        Stake(led).deposit(stake_id, 10**9, idempotency_key="st")
    for i in range(3):
        audit, rid, buyer = _served_and_audited(runtime, node)
        with runtime.session() as s:
            assign_verifier(s, s.get(Audit, audit.id), runtime.settings)
        with runtime.session() as s:
            done = apply_result(s, _reply(audit.id, False), verifier.public_key_hex, runtime.settings)
            assert done.status == AuditStatus.FAILED and "unlikely_tokens" in done.verdict["reasons"]
            assert done.consequences["buyer_made_whole"] and done.consequences["slashed_nano_usd"] > 0
            assert Ledger(s).balance(buyer) == 10**9  # every nano-dollar back
            assert done.evidence["claimed_logprobs"] == [q / 10_000 for q in LPS]
            n = s.get(Node, node.public_key_hex)
            assert n.banned == (i == 2) and n.audits_failed == i + 1
            assert total_balance(s) == 0
    with runtime.session() as s:
        assert Ledger(s).balance(stake_id) < 10**9
        assert s.get(Account, s.get(InferenceRequest, rid).account_id) is not None


@pytest.mark.parametrize("acknowledged", [False, True])
def test_a_failed_verdict_before_settlement_voids_the_job(runtime, acknowledged):
    """The verifier can answer before the job is paid (before the buyer's handler has even
    acknowledged its delivery, or before the settle task ran): the job is voided — the
    buyer is never charged, the cheater never paid — and the stake is still slashed; the
    settle task that runs afterwards moves nothing."""
    from coordinator.delivery import Delivery, acknowledge
    from coordinator.models import RequestStatus
    from coordinator.settlement import accept_receipt

    node, verifier = _node(runtime, "a"), _node(runtime, "b")
    with runtime.session() as s:
        led = Ledger(s)
        stake_id = led.open_account(AccountKind.SELLER_STAKE, ref=f"node:{node.public_key_hex}").id
        Stake(led).deposit(stake_id, 10**9, idempotency_key="st")
    rid, buyer = _request(runtime, node, max_tokens=len(IDS))
    with runtime.session() as s:
        accept_receipt(s, _receipt(node, rid, IDS, LPS), node.public_key_hex,
                       Relayed(4, commitment_of(rid, IDS, LPS)), runtime.settings)
        if acknowledged:
            acknowledge(s, rid, len(IDS), Delivery.COMPLETE)
        audit = maybe_select(s, s.get(InferenceRequest, rid), s.get(Node, node.public_key_hex), IDS, LPS,
                             "length", u=0.0)
    with runtime.session() as s:
        assert s.get(InferenceRequest, rid).status == RequestStatus.SETTLING  # not paid yet
        assign_verifier(s, s.get(Audit, audit.id), runtime.settings)
    with runtime.session() as s:
        done = apply_result(s, _reply(audit.id, False), verifier.public_key_hex, runtime.settings)
        assert done.status == AuditStatus.FAILED and done.consequences["buyer_made_whole"]
        assert done.consequences["slashed_nano_usd"] > 0
    result = runtime.store.settle(rid)  # the queued settle task, late
    assert not result["settled"]
    with runtime.session() as s:
        req = s.get(InferenceRequest, rid)
        assert req.status == RequestStatus.FAILED and req.cost is None
        assert Ledger(s).balance(buyer) == 10**9  # nothing charged, ever
        assert Ledger(s).balance(s.get(Node, node.public_key_hex).earnings_account_id) == 0
        assert total_balance(s) == 0
