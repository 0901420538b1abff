"""Audits on the coordinator: who verifies, what a verdict does to money and reputation."""

from __future__ import annotations

import pytest

from coordinator.audits import assign_verifier, maybe_select
from coordinator.verdicts import apply_result
from coordinator.models import Account, Audit, AuditStatus, InferenceRequest, Node, NodeOffer
from coordinator.settlement import Relayed, settle
from node_agent.identity import Identity
from protocol import ModelOffer, Registration, VerifyResult, commitment_of, fresh_stamp
from pricing.ledger import AccountKind, Ledger, total_balance
from pricing.stake import Stake
from tests.coordinator.test_settlement import _receipt, _request
from coordinator.node_registry import register

IDS, LPS = [5, 6, 7, 8], [-1000, -2000, -1500, -500]


def _node(rt, operator: str, *, trusted: bool = False, passes: int = 0, stake: int = 0) -> Identity:
    """A registered, connected node; `trusted`: the operator's own verifier; `passes`: audits
    it has passed itself (5 qualify it to verify others)."""
    me = Identity.generate()
    reg = Registration(node_id=me.public_key_hex, **fresh_stamp(), region="us-east", max_concurrency=4,
                       operator=operator, models=[ModelOffer(model="tiny", price_in=100_000_000,
                                                             price_out=200_000_000, tokens_per_s=100.0)]).sign(me)
    with rt.session() as s:
        node = register(s, reg, rt.settings)
        node.channel_connected, node.trusted = True, trusted
        node.audits_passed = node.passes_since_failure = passes
        if passes:
            node.reputation = 0.8
        if stake:
            led = Ledger(s)
            Stake(led).deposit(led.open_account(AccountKind.SELLER_STAKE, ref=f"node:{me.public_key_hex}").id, stake,
                               idempotency_key=f"stake-{me.public_key_hex}")
    return me


def _served_and_audited(rt, node: Identity) -> tuple[Audit, str, int]:
    rid, buyer = _request(rt, node, max_tokens=len(IDS))
    with rt.session() as s:
        settle(s, _receipt(node, rid, IDS, LPS), node.public_key_hex, Relayed(4, commitment_of(rid, IDS, LPS)),
               rt.settings)
        req, n = s.get(InferenceRequest, rid), s.get(Node, node.public_key_hex)
        audit = maybe_select(s, req, n, IDS, LPS, "length", rt.settings, u=0.0, prompt_tokens=7)
    return audit, rid, buyer


def _reply(audit_id: int, honest: bool) -> VerifyResult:
    ref = [q / 10_000 for q in LPS] if honest else [-9.0] * 4
    return VerifyResult(audit_id=audit_id, rescore={
        "logprob": ref, "top1_id": IDS if honest else [1, 1, 1, 1], "top1_logprob": ref if honest else [-0.1] * 4,
        "admissible": [honest] * 4, "expected_logprob": ref if honest else [-0.1] * 4, "var_logprob": [0.0] * 4,
        "meta": {"eos_ids": [2]}})


def test_verifier_is_never_the_node_or_its_operator(runtime):
    a, a2 = _node(runtime, "acme"), _node(runtime, "acme", passes=5)
    audit, _, _ = _served_and_audited(runtime, a)
    with runtime.session() as s:
        assert assign_verifier(s, s.get(Audit, audit.id), runtime.settings) is None  # only acme's nodes
    _node(runtime, "newcomer")  # has not passed its own audits: may not judge anyone yet
    with runtime.session() as s:
        assert assign_verifier(s, s.get(Audit, audit.id), runtime.settings) is None
    b = _node(runtime, "other", passes=5)
    with runtime.session() as s:
        verifier, frame = assign_verifier(s, s.get(Audit, audit.id), runtime.settings)
    assert verifier == b.public_key_hex and frame["claimed_ids"] == IDS and frame["type"] == "verify"
    _ = a2


def test_established_nodes_are_audited_at_a_low_rate_segments_too(runtime):
    node = _node(runtime, "x")
    rid, _ = _request(runtime, node)
    with runtime.session() as s:
        req, n = s.get(InferenceRequest, rid), s.get(Node, node.public_key_hex)
        n.jobs, n.audits_passed = 500, 400
        n.session_jobs = 1000
        assert maybe_select(s, req, n, IDS, LPS, "length", runtime.settings, u=0.5) is None  # rate ~ 0.05 now
        assert maybe_select(s, req, n, IDS, LPS, "length", runtime.settings, u=0.01) is not None
        # after a failover the continuing node's part is a job of its own, rescored after the earlier one
        req.payload = {**req.payload, "segments": [{"node_id": "z", "tokens": 2}], "prefix_token_ids": [3, 4]}
        audit = maybe_select(s, req, n, IDS, LPS, "length", runtime.settings, u=0.0)
        assert (audit.segment, audit.claimed["prefix_ids"]) == (1, [3, 4])


def test_pass_raises_reputation_and_pays_the_verifier(runtime):
    node, verifier = _node(runtime, "a"), _node(runtime, "b", passes=5)
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
    node, verifier = _node(runtime, "a"), _node(runtime, "ops", trusted=True)  # a trusted verdict is final
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

    node, verifier = _node(runtime, "a"), _node(runtime, "ops", trusted=True)
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
                             "length", runtime.settings, u=0.0)
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


# ---------------------------------------------------------------- verdicts a cheater cannot abuse
def _assign(rt, audit_id: int) -> str | None:
    with rt.session() as s:
        got = assign_verifier(s, s.get(Audit, audit_id), rt.settings)
    return got[0] if got else None


def _verdict(rt, audit_id: int, verifier: Identity, honest: bool) -> Audit:
    with rt.session() as s:
        return apply_result(s, _reply(audit_id, honest), verifier.public_key_hex, rt.settings)


def _state(rt, node: Identity) -> tuple:
    with rt.session() as s:
        n = s.get(Node, node.public_key_hex)
        return n.audits_passed, n.audits_failed, round(n.reputation, 6), n.banned


def test_a_hostile_verifier_alone_cannot_penalise_an_honest_node(runtime):
    """The cheater is the only other operator online: its false failing verdict waits for a
    second opinion that never comes, and the audit expires unjudged — nothing moves."""
    honest = _node(runtime, "honest", stake=10**9)
    cheat = _node(runtime, "cheat", passes=5)
    audit, rid, buyer = _served_and_audited(runtime, honest)
    before = _state(runtime, honest)
    assert _assign(runtime, audit.id) == cheat.public_key_hex
    first = _verdict(runtime, audit.id, cheat, honest=False)  # a lie
    assert first.status == AuditStatus.PENDING and first.evidence["first"]["verifier_id"] == cheat.public_key_hex
    assert _state(runtime, honest) == before
    assert _assign(runtime, audit.id) is None  # nobody independent of both is around
    runtime.settings.audit_expiry_s = 0.001
    assert runtime.store.sweep()["audits_expired"] == [audit.id]
    with runtime.session() as s:
        assert s.get(Audit, audit.id).status == AuditStatus.EXPIRED
        assert Ledger(s).balance(buyer) < 10**9  # the buyer paid for the job normally
        assert total_balance(s) == 0
    assert _state(runtime, honest) == before


def test_a_confirmation_that_contradicts_the_first_verifier_costs_it_reputation_and_stake(runtime):
    honest = _node(runtime, "honest")
    cheat = _node(runtime, "cheat", passes=5, stake=10**9)
    audit, _, _ = _served_and_audited(runtime, honest)
    _assign(runtime, audit.id)
    _verdict(runtime, audit.id, cheat, honest=False)
    ops = _node(runtime, "ops", trusted=True)  # the operator's verifier comes online
    _node(runtime, "other", passes=5)  # a qualified third party is there too: the trusted one goes first
    assert _assign(runtime, audit.id) == ops.public_key_hex
    done = _verdict(runtime, audit.id, ops, honest=True)
    assert done.status == AuditStatus.PASSED
    assert _state(runtime, honest)[:2] == (1, 0)
    wrong = done.consequences["first_verifier"]
    assert wrong["node_id"] == cheat.public_key_hex and wrong["slashed_nano_usd"] == runtime.settings.min_slash_nano_usd
    with runtime.session() as s:
        c = s.get(Node, cheat.public_key_hex)
        assert c.verdicts_overturned == 1 and c.reputation < runtime.settings.verifier_min_reputation
        assert total_balance(s) == 0
    # no longer qualified: the next audit is not sent to it
    audit2, _, _ = _served_and_audited(runtime, honest)
    assert _assign(runtime, audit2.id) != cheat.public_key_hex


def test_two_independent_failing_verdicts_penalise_with_a_deterring_slash(runtime):
    from scheduler.audit import deterrent_slash

    cheat = _node(runtime, "cheat", stake=10**12)
    v1, v2 = _node(runtime, "v1", passes=5), _node(runtime, "v2", passes=5)
    audit, rid, buyer = _served_and_audited(runtime, cheat)
    first = _assign(runtime, audit.id)
    _verdict(runtime, audit.id, v1 if first == v1.public_key_hex else v2, honest=False)
    second = _assign(runtime, audit.id)
    assert second not in (None, first)
    done = _verdict(runtime, audit.id, v1 if second == v1.public_key_hex else v2, honest=False)
    assert done.status == AuditStatus.FAILED and done.consequences["buyer_made_whole"]
    with runtime.session() as s:
        cost = s.get(InferenceRequest, rid).cost
        assert Ledger(s).balance(buyer) == 10**9
    # the slash: rate 1.0 for a new node's job -> 3x the gain in expectation at p = 0.99
    assert done.consequences["slash_wanted_nano_usd"] == deterrent_slash(
        cost, 1.0, floor=runtime.settings.min_slash_nano_usd)
    c = done.consequences  # the stake also covers what the node's earnings could not refund
    assert c["slashed_nano_usd"] == c["slash_wanted_nano_usd"] + c["refunded_nano_usd"] - c["clawed_back_nano_usd"]
    assert _state(runtime, cheat)[1] == 1


def test_when_a_verifier_is_banned_the_passes_it_gave_are_judged_again(runtime):
    accomplice = _node(runtime, "acc")
    crook = _node(runtime, "crook", passes=5, stake=10**9)
    audit, _, _ = _served_and_audited(runtime, accomplice)
    assert _assign(runtime, audit.id) == crook.public_key_hex
    assert _verdict(runtime, audit.id, crook, honest=True).status == AuditStatus.PASSED
    assert _state(runtime, accomplice)[0] == 1
    ops = _node(runtime, "ops", trusted=True)
    for _ in range(3):  # the crook itself is caught three times and banned
        a, _, _ = _served_and_audited(runtime, crook)
        assert _assign(runtime, a.id) == ops.public_key_hex
        last = _verdict(runtime, a.id, ops, honest=False)
    assert last.consequences["banned"] and last.consequences["verdicts_rerun"] == [audit.id]
    with runtime.session() as s:
        again = s.get(Audit, audit.id)
        assert again.status == AuditStatus.PENDING and again.evidence["superseded"]["verifier_id"] == crook.public_key_hex
    assert _state(runtime, accomplice)[0] == 0
    assert _assign(runtime, audit.id) == ops.public_key_hex  # judged again, by someone else


def test_a_banned_nodes_stake_cannot_be_unbonded(client, runtime):
    from protocol import UnbondRequest
    from tests.coordinator.test_node_identity import post

    runtime.settings.challenge_window_s = 0
    node = _node(runtime, "x", stake=10**9)
    with runtime.session() as s:
        s.get(Node, node.public_key_hex).banned = True
    r = post(client, "/v1/nodes/me/unbond",
             UnbondRequest(node_id=node.public_key_hex, **fresh_stamp(), amount=1, idempotency_key="u").sign(node))
    assert r.status_code == 409 and r.json()["error"]["code"] == "stake_frozen" and "banned" in r.text


def test_stake_is_frozen_while_an_audit_is_open(client, runtime):
    from protocol import UnbondRequest
    from tests.coordinator.test_node_identity import post

    runtime.settings.challenge_window_s = 0
    node = _node(runtime, "x", stake=10**9)
    _served_and_audited(runtime, node)
    r = post(client, "/v1/nodes/me/unbond",
             UnbondRequest(node_id=node.public_key_hex, **fresh_stamp(), amount=1, idempotency_key="u").sign(node))
    assert r.status_code == 409 and "not judged yet" in r.text


def test_evidence_across_audits_catches_int8_served_as_bf16_and_needs_a_second_opinion(runtime):
    """Each audit of a node declaring bf16 passes on its own, but its per-token differences
    look like int8 weights: the evidence adds up across audits until the audit at hand fails.
    An ordinary verifier's alarm waits for a second opinion, like any failing verdict."""
    from scheduler.evidence import THRESHOLD

    node = _node(runtime, "int8", stake=10**10)
    with runtime.session() as s:
        s.exec(NodeOffer.__table__.update().where(NodeOffer.node_id == node.public_key_hex).values(dtype="bfloat16"))
    ops = _node(runtime, "ops", trusted=True)
    # claimed log-probs off the reference by ~0.35 nats a token: inside the bf16 allowance,
    # in the bins where int8 weights land
    shifted = [q / 10_000 + (0.35 if i % 2 else -0.35) for i, q in enumerate(LPS)]

    def reply(aid):
        r = _reply(aid, True)
        r.rescore["logprob"] = shifted
        return r

    outcomes = []
    for _ in range(20):
        audit, _, _ = _served_and_audited(runtime, node)
        assert _assign(runtime, audit.id) == ops.public_key_hex
        with runtime.session() as s:
            done = apply_result(s, reply(audit.id), ops.public_key_hex, runtime.settings)
        outcomes.append(done.status)
        if done.status == AuditStatus.FAILED:
            assert "precision_evidence" in done.verdict["reasons"]
            assert done.verdict["precision_evidence"]["cusum"] > THRESHOLD
            break
    assert outcomes[-1] == AuditStatus.FAILED and AuditStatus.PASSED in outcomes
    with runtime.session() as s:
        assert s.get(Node, node.public_key_hex).precision_cusum == 0  # reset after the alarm


def test_a_node_that_overbills_prompt_tokens_fails_its_audit(runtime):
    """The prompt count is the node's own (its tokenizer): the verifier counts the prompt
    again, and a receipt that billed more than that fails."""
    node, ops = _node(runtime, "a", stake=10**9), _node(runtime, "ops", trusted=True)
    for counted, status in ((7, AuditStatus.PASSED), (3, AuditStatus.FAILED)):
        audit, _, _ = _served_and_audited(runtime, node)  # its receipt billed 7 prompt tokens
        _assign(runtime, audit.id)
        r = _reply(audit.id, True)
        r.rescore["meta"]["prompt_tokens"] = counted
        with runtime.session() as s:
            done = apply_result(s, r, ops.public_key_hex, runtime.settings)
        assert done.status == status
    assert "prompt_overbilled" in done.verdict["reasons"] and done.consequences["buyer_made_whole"]
