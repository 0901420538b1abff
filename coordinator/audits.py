"""Verification in the market loop: pick finished jobs to audit, send them to a verifier
node, judge the verifier's rescoring, and apply the consequences.

The decisions are the scheduler's pure code (`scheduler.audit` for rates, verifier choice,
reputation and economics; `scheduler.verification` for the per-job check); this module
loads, stores and moves money. A job is chosen *after* its receipt is accepted, from a
random draw, so the node cannot tell audited jobs from the rest. Failed audits refund the
buyer (out of the node's earnings, then its stake), slash stake, cut reputation and ban
after repeated failures; every audit keeps both log-prob vectors as evidence.
"""

from __future__ import annotations

import random
from datetime import timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select

from coordinator.delivery import quote_of
from coordinator.models import Audit, AuditStatus, InferenceRequest, Node, NodeOffer, ReceiptRecord, RequestStatus
from coordinator.models.account import utcnow
from coordinator.node_registry import is_live
from coordinator.settlement import fail_request
from coordinator.settings import CoordinatorSettings
from protocol import LOGPROB_SCALE, Sampling, VerifyJob, VerifyResult
from scheduler.audit import (
    AuditPolicy, NodeHistory, ReputationPolicy, VerifierCandidate, cheating_economics, select_verifier,
    should_audit, update_reputation,
)
from pricing.ledger import Ledger
from pricing.money import request_cost
from scheduler.verification import verify_rescored

AUDIT_POLICY = AuditPolicy()
REPUTATION = ReputationPolicy()
RESEND_AFTER_S = 60.0
_rng = random.SystemRandom()


def history(node: Node) -> NodeHistory:
    return NodeHistory(jobs=node.jobs, passes=node.audits_passed, failures=node.audits_failed,
                       passes_since_failure=node.passes_since_failure)


def audit_rate(node: Node) -> float:
    return AUDIT_POLICY.rate(history(node))


def maybe_select(session: Session, req: InferenceRequest, node: Node, token_ids: list[int],
                 logprobs_q: list[int], finish_reason: str, *, u: float | None = None) -> Audit | None:
    """Count the job and, with the node's audit rate, keep it for an audit."""
    node.jobs += 1
    session.add(node)
    if req.payload.get("segments") or not token_ids:  # failed-over jobs mix several nodes' tokens
        return None
    canary = bool(req.payload.get("canary"))  # the coordinator's own test purchase: always checked
    if not canary and not should_audit(AUDIT_POLICY, history(node), _rng.random() if u is None else u):
        return None
    offer = session.exec(select(NodeOffer).where(NodeOffer.node_id == node.id, NodeOffer.model == req.model)).first()
    audit = Audit(request_id=req.id, node_id=node.id, claimed={
        "ids": list(token_ids), "logprobs_q": list(logprobs_q), "finish_reason": finish_reason,
        "dtype": offer.dtype if offer else "float32"})
    session.add(audit)
    session.flush()
    return audit


def assign_verifier(session: Session, audit: Audit, settings: CoordinatorSettings) -> tuple[str, dict] | None:
    """Choose a verifier (another operator's live node serving the model) and build its job."""
    req = session.get(InferenceRequest, audit.request_id)
    audited = session.get(Node, audit.node_id)
    rows = session.exec(select(NodeOffer, Node).join(Node, Node.id == NodeOffer.node_id)
                        .where(NodeOffer.model == req.model, NodeOffer.can_verify == True)).all()  # noqa: E712
    busy = _busy(session, [n.id for _, n in rows])
    candidates = [VerifierCandidate(node_id=n.id, operator_id=n.operator or n.id, models=[o.model],
                                    reputation=n.reputation, online=is_live(n, settings), banned=n.banned,
                                    free_slots=max(0, n.max_concurrency - busy.get(n.id, 0)))
                  for o, n in rows]
    verifier = select_verifier(audited.id, audited.operator or audited.id, req.model, candidates,
                               rng=random.Random(_rng.random()), min_reputation=settings.verifier_min_reputation)
    if verifier is None:
        return None
    audit.verifier_id, audit.status, audit.sent_at = verifier, AuditStatus.SENT, utcnow()
    session.add(audit)
    job = VerifyJob(audit_id=audit.id, model=req.model, kind=req.kind, messages=req.payload.get("messages"),
                    prompt=req.payload.get("prompt"), claimed_ids=audit.claimed["ids"],
                    sampling=Sampling(**req.payload["sampling"]))
    return verifier, job.model_dump()


def _busy(session: Session, node_ids: list[str]) -> dict[str, int]:
    """Per node: requests it is serving and audits it has been sent, not yet answered."""
    if not node_ids:
        return {}
    serving = session.exec(select(InferenceRequest.node_id, func.count()).where(
        col(InferenceRequest.node_id).in_(node_ids),
        col(InferenceRequest.status).in_((RequestStatus.ASSIGNED, RequestStatus.RUNNING)))
        .group_by(InferenceRequest.node_id)).all()
    verifying = session.exec(select(Audit.verifier_id, func.count()).where(
        col(Audit.verifier_id).in_(node_ids), Audit.status == AuditStatus.SENT).group_by(Audit.verifier_id)).all()
    out: dict[str, int] = {}
    for node_id, n in [*serving, *verifying]:
        out[node_id] = out.get(node_id, 0) + n
    return out


def apply_result(session: Session, result: VerifyResult, verifier_id: str,
                 settings: CoordinatorSettings) -> Audit | None:
    """Judge a verifier's reply and apply the consequences; None if it is not expected."""
    audit = session.get(Audit, result.audit_id, with_for_update=True)
    if audit is None or audit.status != AuditStatus.SENT or audit.verifier_id != verifier_id:
        return None
    if result.error or result.rescore is None:  # the verifier could not do it: another will
        audit.status, audit.verifier_id = AuditStatus.PENDING, None
        session.add(audit)
        return audit
    req = session.get(InferenceRequest, audit.request_id)
    node = session.get(Node, audit.node_id)
    verifier_offer = session.exec(select(NodeOffer).where(NodeOffer.node_id == verifier_id,
                                                          NodeOffer.model == req.model)).first()
    claimed = audit.claimed
    sampling = req.payload["sampling"]
    try:
        verdict = verify_rescored(
            claimed["ids"], [q / LOGPROB_SCALE for q in claimed["logprobs_q"]], result.rescore, sampling,
            model=req.model, node_dtype=claimed.get("dtype"),
            verifier_dtype=verifier_offer.dtype if verifier_offer else "float32",
            finish_reason=claimed.get("finish_reason"), eos_ids=result.rescore.get("meta", {}).get("eos_ids", ()),
            has_stop_strings=bool(sampling.get("stop")), receipt_tokens=len(claimed["ids"]))
    except (KeyError, TypeError, ValueError) as exc:  # a malformed reply is the verifier's fault
        audit.status, audit.verifier_id = AuditStatus.PENDING, None
        audit.evidence = {"rejected_reply": f"{type(exc).__name__}: {exc}"}
        session.add(audit)
        return audit
    # Lock order as in settlement: request, node, then ledger rows. The node row is locked
    # (and re-read) so that concurrent verdicts about one node never lose a counter update.
    req = session.get(InferenceRequest, audit.request_id, with_for_update=True, populate_existing=True)
    job_value = _job_value(session, req)
    if not verdict.passed and req.status == RequestStatus.SETTLING:
        # Not paid yet: void it, so the buyer is never charged for the job (nor the node
        # paid); a settle task that runs later finds it finished and moves nothing.
        fail_request(session, req.id, f"audit {audit.id} failed")
    node = session.get(Node, audit.node_id, with_for_update=True, populate_existing=True)
    audit.verdict = verdict.as_dict()
    audit.evidence = {"claimed_logprobs": [q / LOGPROB_SCALE for q in claimed["logprobs_q"]],
                      "reference": result.rescore}
    audit.status = AuditStatus.PASSED if verdict.passed else AuditStatus.FAILED
    audit.resolved_at = utcnow()
    if verdict.passed:
        node.audits_passed += 1
        node.passes_since_failure += 1
    else:
        node.audits_failed += 1
        node.passes_since_failure = 0
    rep = update_reputation(node.reputation, node.audits_failed, verdict.passed, REPUTATION)
    node.reputation, node.banned = rep.reputation, node.banned or rep.banned
    consequences = {"reputation": rep.reputation, "banned": node.banned, "reason": rep.reason}
    if not verdict.passed:
        from coordinator.penalties import penalise

        consequences.update(penalise(session, req, node, settings, job_value))
    consequences["verifier_paid_nano_usd"] = _pay_verifier(session, audit, req, verifier_id, verifier_offer)
    audit.consequences = consequences
    session.add_all([audit, node])
    return audit


def _job_value(session: Session, req: InferenceRequest) -> int:
    """What the audited job is worth at the node's price (charged or not): sizes the slash."""
    if req.cost is not None:
        return req.cost
    record = session.get(ReceiptRecord, req.id)
    if record is None:
        return 0
    quote = quote_of(req, min(record.prompt_tokens, req.prompt_tokens_est), record.completion_tokens)
    return sum(quote.seller_gross())


def _pay_verifier(session: Session, audit: Audit, req: InferenceRequest, verifier_id: str,
                  offer: NodeOffer | None) -> int:
    """The verifier's prefill (prompt + claimed tokens) at its own input price, from fees."""
    verifier = session.get(Node, verifier_id)
    tokens = (req.prompt_tokens or 0) + len(audit.claimed["ids"])
    fee = request_cost(tokens, 0, offer.price_in if offer else 0, 0)
    if verifier is None or fee == 0:
        return 0
    return Ledger(session).pay_from_platform(verifier.earnings_account_id, fee, kind="verify",
                                             idempotency_key=f"verify-fee:{audit.id}", request_ref=req.id)


def expire_stale(session: Session, settings: CoordinatorSettings) -> list[int]:
    """Audits no capable verifier has answered within `audit_expiry_s`: EXPIRED (counted
    per node in the operator's views), so that a market without verifiers never piles
    them up. Returns their ids."""
    cutoff = utcnow() - timedelta(seconds=settings.audit_expiry_s)
    rows = session.exec(select(Audit).where(col(Audit.status).in_((AuditStatus.PENDING, AuditStatus.SENT)),
                                            Audit.created_at < cutoff).limit(1000)
                        .with_for_update(skip_locked=True)).all()
    for a in rows:
        a.status, a.resolved_at = AuditStatus.EXPIRED, utcnow()
        a.consequences = {"reason": "no capable verifier answered in time"}
        session.add(a)
    return [a.id for a in rows]


def due_for_dispatch(session: Session, limit: int = 100) -> list[Audit]:
    """Audits without a verifier, or whose verifier has not answered in time: the oldest
    `limit` of them (a sweep's work never grows with the backlog)."""
    cutoff = utcnow() - timedelta(seconds=RESEND_AFTER_S)
    return list(session.exec(select(Audit).where(
        (Audit.status == AuditStatus.PENDING) | ((Audit.status == AuditStatus.SENT) & (col(Audit.sent_at) < cutoff)))
        .order_by(col(Audit.id)).limit(limit)).all())


def economics(session: Session, node: Node, stake: int) -> dict:
    """Whether cheating has negative expected value for this node at its audit rate."""
    offer = session.exec(select(NodeOffer).where(NodeOffer.node_id == node.id)).first()
    done = session.exec(select(InferenceRequest.completion_tokens).where(
        InferenceRequest.node_id == node.id, InferenceRequest.completion_tokens.is_not(None))).all()  # type: ignore[union-attr]
    tokens = int(sum(done) / len(done)) if done else 256
    e = cheating_economics(price_out=offer.price_out if offer else 0, tokens_per_job=max(tokens, 1), stake=stake,
                           audit_rate=audit_rate(node))
    return {"node_id": node.id, "audit_rate": e.audit_rate, "stake_nano_usd": stake, "tokens_per_job": tokens,
            "gain_per_job_nano_usd": e.gain_per_job, "expected_penalty_per_job_nano_usd": e.expected_penalty_per_job,
            "ratio": e.ratio, "deterrent": e.deterrent, "margin": e.margin, "min_slash_nano_usd": e.min_slash,
            "min_audit_rate": e.min_audit_rate}
