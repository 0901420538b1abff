"""Verification in the market loop: pick finished jobs to audit, choose who verifies them,
expire what no verifier answers, and report whether cheating pays (`verdicts.py` judges
the replies and applies the consequences).

The decisions are the scheduler's pure code (`scheduler.audit`: rates, verifier choice,
economics); this module loads and stores. A job is chosen *after* its receipt is accepted,
from a random draw, so the node cannot tell audited jobs from the rest; the rate rises for
new nodes, after failures and after every (re)connect. Only nodes that passed their own
audits with stake at risk, or the operator's trusted verifiers, judge others.
"""

from __future__ import annotations

import random
from datetime import timedelta

from sqlalchemy import func, or_
from sqlmodel import Session, col, select

from coordinator.models import Audit, AuditStatus, InferenceRequest, Node, NodeOffer, RequestStatus
from coordinator.models.account import utcnow
from coordinator.node_registry import is_live
from coordinator.settings import CoordinatorSettings
from protocol import Sampling, VerifyJob
from pricing.stake import bonded_by_ref
from scheduler.audit import (
    AuditPolicy, NodeHistory, ReputationPolicy, VerifierCandidate, VerifierPolicy, cheating_economics,
    select_verifier,
)

REPUTATION = ReputationPolicy()
RESEND_AFTER_S = 60.0
_rng = random.SystemRandom()


def audit_policy(settings: CoordinatorSettings) -> AuditPolicy:
    return AuditPolicy(new_jobs=settings.audit_new_jobs, half_life=settings.audit_half_life, floor=settings.audit_floor,
                       failure_floor_step=settings.audit_failure_floor_step,
                       recheck_passes=settings.audit_recheck_passes, session_jobs=settings.audit_session_jobs,
                       session_rate=settings.audit_session_rate)


def verifier_policy(settings: CoordinatorSettings) -> VerifierPolicy:
    return VerifierPolicy(min_passes=settings.verifier_min_passes, min_reputation=settings.verifier_min_reputation,
                          min_stake=settings.verifier_min_stake)


def history(node: Node) -> NodeHistory:
    return NodeHistory(jobs=node.jobs, passes=node.audits_passed, failures=node.audits_failed,
                       passes_since_failure=node.passes_since_failure, session_jobs=node.session_jobs)


def audit_rate(node: Node, settings: CoordinatorSettings) -> float:
    return audit_policy(settings).rate(history(node))


def is_trusted(node: Node, settings: CoordinatorSettings) -> bool:
    return node.trusted or node.id in settings.trusted_verifiers


def maybe_select(session: Session, req: InferenceRequest, node: Node, token_ids: list[int],
                 logprobs_q: list[int], finish_reason: str | None, settings: CoordinatorSettings, *,
                 u: float | None = None, prompt_tokens: int | None = None, count_job: bool = True) -> Audit | None:
    """Count the job and, with the node's audit rate, keep it for an audit (the rate at
    the time of the job is kept with it: it sizes the slash if the job was a cheat).

    After a failover every node's part of the stream is a job of its own: the part of a
    node that stalled or failed is offered here as it leaves (`failover.fail_over`, before
    the segment is recorded; `finish_reason` None), the last node's when its receipt is in.
    Its verifier rescores it after the earlier parts (`prefix_ids`), which are not its to
    answer for. A continuation made from text (an engine without token ids) cannot be
    re-scored exactly and is not audited."""
    rate = audit_rate(node, settings)
    if count_job:  # else the caller counts it after its commit (`job_counts.py`)
        node.jobs += 1
        node.session_jobs += 1
        session.add(node)
    segments = req.payload.get("segments", [])
    prefix = list(req.payload.get("prefix_token_ids", [])) if segments else []
    if not token_ids or len(logprobs_q) != len(token_ids) or (
            segments and (not req.payload.get("prefix_exact", True)
                          or len(prefix) != sum(int(sg["tokens"]) for sg in segments))):
        return None
    canary = bool(req.payload.get("canary"))  # the coordinator's own test purchase: always checked
    if not canary and not (_rng.random() if u is None else u) < rate:
        return None
    offer = session.exec(select(NodeOffer).where(NodeOffer.node_id == node.id, NodeOffer.model == req.model)).first()
    audit = Audit(request_id=req.id, node_id=node.id, segment=len(segments), claimed={
        "ids": list(token_ids), "logprobs_q": list(logprobs_q), "finish_reason": finish_reason,
        "dtype": offer.dtype if offer else "float32", "quantization": offer.quantization if offer else None,
        "rate": 1.0 if canary else rate, "prompt_tokens": prompt_tokens, "prefix_ids": prefix,
        "price_in": req.price_in or 0, "price_out": req.price_out or 0})
    session.add(audit)
    session.flush()
    return audit


def assign_verifier(session: Session, audit: Audit, settings: CoordinatorSettings) -> tuple[str, dict] | None:
    """Choose a verifier and build its job: a node of another operator serving the model, that
    has earned the right to judge (`VerifierPolicy`) or is the operator's own. A confirmation
    (a second opinion on a failing verdict) also excludes the first verifier's operator, and
    goes to a trusted verifier where one is live; so does a seller's appeal
    (`reverification.py`), which excludes every verifier (and operator) that judged it."""
    req = session.get(InferenceRequest, audit.request_id)
    audited = session.get(Node, audit.node_id)
    candidates = verifier_candidates(session, req.model, settings)
    first = (audit.evidence or {}).get("first")
    appeal = (audit.evidence or {}).get("reverify")  # a seller's appeal: none of the verifiers so far
    exclude = [first["operator"], first["verifier_id"]] if first else []
    exclude += appeal["exclude"] if appeal else []
    verifier = select_verifier(audited.id, audited.operator or audited.id, req.model, candidates,
                               rng=random.Random(_rng.random()), policy=verifier_policy(settings),
                               exclude=exclude, prefer_trusted=bool(first or appeal))
    if verifier is None:
        return None
    audit.verifier_id, audit.status, audit.sent_at = verifier, AuditStatus.SENT, utcnow()
    session.add(audit)
    job = VerifyJob(audit_id=audit.id, model=req.model, kind=req.kind, messages=req.payload.get("messages"),
                    prompt=req.payload.get("prompt"),
                    claimed_ids=list(audit.claimed.get("prefix_ids", [])) + list(audit.claimed["ids"]),
                    sampling=Sampling(**req.payload["sampling"]))
    return verifier, job.model_dump()


def verifier_candidates(session: Session, model: str, settings: CoordinatorSettings) -> list[VerifierCandidate]:
    """Every node offering to verify `model`, as `select_verifier` sees it."""
    rows = session.exec(select(NodeOffer, Node).join(Node, Node.id == NodeOffer.node_id)
                        .where(NodeOffer.model == model, NodeOffer.can_verify == True)).all()  # noqa: E712
    busy = _busy(session, [n.id for _, n in rows])
    stakes = bonded_by_ref(session, [f"node:{n.id}" for _, n in rows])
    return [VerifierCandidate(node_id=n.id, operator_id=n.operator or n.id, models=[o.model],
                              reputation=n.reputation, online=is_live(n, settings), banned=n.banned,
                              free_slots=max(0, n.max_concurrency - busy.get(n.id, 0)),
                              passes=n.audits_passed, stake=stakes.get(f"node:{n.id}", 0),
                              trusted=is_trusted(n, settings))
            for o, n in rows]


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


def due_for_dispatch(session: Session, settings: CoordinatorSettings, limit: int = 100) -> list[Audit]:
    """Audits without a verifier, or whose verifier has not answered in time, that some live,
    qualified verifier of another operator could take now: the oldest `limit` of them. A
    backlog nobody can verify (a market of one operator) costs one query per model, not a
    verifier search per audit (a sweep's work never grows with the backlog)."""
    cutoff = utcnow() - timedelta(seconds=RESEND_AFTER_S)
    due = (Audit.status == AuditStatus.PENDING) | ((Audit.status == AuditStatus.SENT) & (col(Audit.sent_at) < cutoff))
    # The models some node offers (a small table), not those of the due audits: reading those
    # joined every pending audit to its request at each sweep, inside the sweep's write
    # transaction (10,000 unverifiable audits cost the hot path 9 %, bench/backlog.py).
    models = session.exec(select(NodeOffer.model).distinct()).all()
    policy, which = verifier_policy(settings), []
    for model in models:
        ops = {c.operator_id for c in verifier_candidates(session, model, settings)
               if c.online and not c.banned and policy.qualifies(c)}
        operator = func.coalesce(Node.operator, Node.id)
        if len(ops) > 1:  # every audited operator has someone else to judge it
            which.append(InferenceRequest.model == model)
        elif ops:
            which.append((InferenceRequest.model == model) & (operator != next(iter(ops))))
    if not which:
        return []
    return list(session.exec(select(Audit).join(InferenceRequest, InferenceRequest.id == Audit.request_id)
                             .join(Node, Node.id == Audit.node_id).where(due, or_(*which))
                             .order_by(col(Audit.id)).limit(limit)).all())


def economics(session: Session, node: Node, stake: int, settings: CoordinatorSettings) -> dict:
    """Whether cheating has negative expected value for this node: at its audit rate now, for
    a typical job of its, with exactly the slash the code would take (capped by its stake)."""
    offer = session.exec(select(NodeOffer).where(NodeOffer.node_id == node.id)).first()
    done = session.exec(select(InferenceRequest.completion_tokens).where(
        InferenceRequest.node_id == node.id, InferenceRequest.completion_tokens.is_not(None))).all()  # type: ignore[union-attr]
    tokens = int(sum(done) / len(done)) if done else 256
    rate = audit_rate(node, settings)
    e = cheating_economics(price_out=offer.price_out if offer else 0, tokens_per_job=max(tokens, 1), stake=stake,
                           audit_rate=rate, detection_prob=settings.detection_prob, margin=settings.slash_margin,
                           floor=settings.min_slash_nano_usd)
    return {"node_id": node.id, "audit_rate": e.audit_rate, "audit_floor": settings.audit_floor,
            "stake_nano_usd": stake, "tokens_per_job": tokens,
            "gain_per_job_nano_usd": e.gain_per_job, "slash_per_caught_job_nano_usd": e.details["slash_wanted"],
            "slash_capped_by_stake": e.details["slash_capped_by_stake"],
            "expected_penalty_per_job_nano_usd": e.expected_penalty_per_job,
            "ratio": e.ratio, "deterrent": e.deterrent, "margin": e.margin, "min_stake_to_deter_nano_usd": e.min_slash,
            "min_audit_rate": e.min_audit_rate}
