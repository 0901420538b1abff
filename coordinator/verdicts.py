"""A verifier's reply to an audit: judged, confirmed when it would penalise, then applied.

- A passing verdict counts for the node at once.
- A failing verdict from an ordinary verifier moves nothing yet: the audit goes back to the
  queue for a second opinion (`evidence.first` keeps the first verdict) from a verifier of
  yet another operator, the operator's trusted one where live. If the second fails too, the
  node is penalised; if it passes, the node gets the pass and the first verifier, whom the
  confirmation contradicts, loses reputation and a slice of stake. A trusted verifier's
  failing verdict is final. With no second verifier around the audit expires unjudged:
  one node alone can never penalise another.
- When a node is banned, the passes it gave others are re-run by other verifiers (a
  cheater's verdicts are worth nothing), and confirmations it set off start over.
- After a failover each node's segment is audited on its own (`audits.maybe_select`): the
  verifier rescores it after the earlier segments, and only its own part is judged. A failed
  segment is priced at zero if the request is not paid yet (`delivery.void_segment`), else
  the buyer gets back what it paid for that segment; the other nodes' segments stand.
- Passing audits also add to the node's evidence across audits (`scheduler.evidence`):
  int8 weights served as bf16 pass most single audits but not a run of them; when that
  evidence crosses its threshold the audit at hand fails like any other.

Locks: audit, request, then node rows in id order, then ledger rows (settlement's order).
"""

from __future__ import annotations

from sqlmodel import Session, col, select

from coordinator import reverification
from coordinator.audits import REPUTATION, audit_rate, is_trusted
from coordinator.models import Audit, AuditStatus, InferenceRequest, Node, NodeOffer, ReceiptRecord, RequestStatus
from coordinator.models.account import utcnow
from coordinator.delivery import quote_of, void_segment
from coordinator.penalties import penalise, punish_false_verdict
from coordinator.settings import CoordinatorSettings
from coordinator.settlement import charged_parts, fail_request
from pricing.ledger import Ledger
from pricing.money import fee_of, request_cost
from protocol import LOGPROB_SCALE, VerifyResult
from scheduler.audit import deterrent_slash, update_reputation
from scheduler.evidence import PrecisionEvidence
from scheduler.verification import noise_scale_for, verify_rescored

PRECISION = PrecisionEvidence()


def apply_result(session: Session, result: VerifyResult, verifier_id: str,
                 settings: CoordinatorSettings) -> Audit | None:
    """Judge a verifier's reply and apply the consequences; None if it is not expected."""
    audit = session.get(Audit, result.audit_id, with_for_update=True, populate_existing=True)
    if audit is None or audit.status != AuditStatus.SENT or audit.verifier_id != verifier_id:
        return None
    if result.error or result.rescore is None:  # the verifier could not do it: another will
        audit.status, audit.verifier_id = AuditStatus.PENDING, None
        session.add(audit)
        return audit
    req = session.get(InferenceRequest, audit.request_id, with_for_update=True, populate_existing=True)
    result = _own_part(result, len(audit.claimed.get("prefix_ids") or []))
    verifier_offer = session.exec(select(NodeOffer).where(NodeOffer.node_id == verifier_id,
                                                          NodeOffer.model == req.model)).first()
    try:
        verdict = _judge(audit, req, result, verifier_offer)
    except (KeyError, TypeError, ValueError) as exc:  # a malformed reply is the verifier's fault
        audit.status, audit.verifier_id = AuditStatus.PENDING, None
        audit.evidence = {**(audit.evidence or {}), "rejected_reply": f"{type(exc).__name__}: {exc}"}
        session.add(audit)
        return audit
    first = (audit.evidence or {}).get("first")
    appeal = (audit.evidence or {}).get("reverify")
    nodes = _lock_nodes(session, {audit.node_id, verifier_id, *([first["verifier_id"]] if first else []),
                                  *(appeal["failing_verifiers"] if appeal else [])})
    node, verifier = nodes[audit.node_id], nodes.get(verifier_id)
    evidence = {"claimed_logprobs": [q / LOGPROB_SCALE for q in audit.claimed["logprobs_q"]],
                "reference": result.rescore}
    round_ = 3 + len(appeal["passes"]) if appeal else 2 if first else 1
    paid = _pay_verifier(session, audit, req, verifier_id, verifier_offer, round_=round_)
    if appeal and verifier is not None:  # the seller's appeal of a failed audit (`reverification.py`)
        reverification.on_verdict(session, audit, {**verdict.as_dict(), "verifier_paid_nano_usd": paid}, verifier,
                                  is_trusted(verifier, settings), nodes, settings)
        return audit
    precision = _precision_evidence(node, audit, req, result, verifier_offer) if verdict.passed else None
    failed = not verdict.passed or (precision or {}).get("alarm", False)
    if failed and not first and not (verifier is not None and is_trusted(verifier, settings)):
        # A single ordinary verifier's failing verdict (or the evidence alarm its reference set
        # off): ask another before anything moves.
        if precision:
            node.precision_cusum = precision["before"]
            session.add(node)
        audit.evidence = {"first": {"verifier_id": verifier_id, "operator": verifier.operator or verifier_id,
                                    "verdict": {**verdict.as_dict(), "precision_evidence": precision},
                                    **evidence, "verifier_paid_nano_usd": paid}}
        audit.status, audit.verifier_id, audit.sent_at = AuditStatus.PENDING, None, None
        session.add(audit)
        return audit
    audit.verdict = {**verdict.as_dict(), **({"precision_evidence": precision} if precision else {})}
    if precision and precision["alarm"]:
        audit.verdict["passed"] = False
        audit.verdict["reasons"] = [*audit.verdict.get("reasons", []), "precision_evidence"]
    audit.evidence = {**evidence, **({"first": first} if first else {})}
    audit.status = AuditStatus.FAILED if failed else AuditStatus.PASSED
    audit.resolved_at = utcnow()
    consequences = _count(session, node, not failed, settings)
    if failed:
        if not req.payload.get("segments"):  # one node served it all
            voided = req.status == RequestStatus.SETTLING
            if voided:
                # Not paid yet: void it, so the buyer is never charged for the job (nor the node
                # paid); a settle task that runs later finds it finished and moves nothing.
                fail_request(session, req.id, f"audit {audit.id} failed")
            refund, value, ref = req.cost or 0, _job_value(session, req), req.id
        else:
            voided = not req.status.finished
            refund, value, ref = _fail_segment(session, req, audit, settings), _segment_value(audit), \
                f"{req.id}:s{audit.segment}"
            consequences["segment"] = audit.segment
        if voided:  # the node's pay for the job, never paid: owed back if an appeal overturns this
            consequences["voided_pay_nano_usd"] = value - fee_of(value, settings.platform_fee_bps)
        slash = deterrent_slash(value, float(audit.claimed.get("rate", 1.0)), detection_prob=settings.detection_prob,
                                margin=settings.slash_margin, floor=settings.min_slash_nano_usd)
        consequences.update(penalise(session, req, node, slash, refund=refund, ref=ref))
    elif first:  # the confirmation contradicts the first verifier
        wrong = nodes.get(first["verifier_id"])
        if wrong is not None:
            consequences["first_verifier"] = punish_false_verdict(session, wrong, audit, settings)
    consequences["verifier_paid_nano_usd"] = paid
    audit.consequences = consequences
    session.add(audit)
    if node.banned:
        consequences["verdicts_rerun"] = rerun_verdicts_of(session, node)
    return audit


def _precision_evidence(node: Node, audit: Audit, req: InferenceRequest, result: VerifyResult,
                        verifier_offer: NodeOffer | None) -> dict | None:
    """Add this audit's evidence that the node serves int8 as the bf16 it declares; an alarm
    (the CUSUM across its audits crossed the threshold) fails the audit and resets it."""
    claimed = audit.claimed
    if not PRECISION.applies(claimed.get("dtype"), claimed.get("quantization"),
                             verifier_offer.dtype if verifier_offer else "float32"):
        return None
    llr = PRECISION.audit_llr([q / LOGPROB_SCALE for q in claimed["logprobs_q"]], result.rescore["logprob"],
                              noise_scale_for(req.model))
    before = node.precision_cusum
    node.precision_cusum, alarm = PRECISION.update(before, llr)
    out = {"llr": round(llr, 4), "cusum": round(node.precision_cusum, 4), "threshold": PRECISION.threshold,
           "alarm": alarm, "before": before}
    if alarm:
        node.precision_cusum = 0.0
    return out


PROMPT_TOKEN_SLACK = 2  # engines of one model may differ by a special token or two


def _judge(audit: Audit, req: InferenceRequest, result: VerifyResult, verifier_offer: NodeOffer | None):
    claimed, sampling = audit.claimed, req.payload["sampling"]
    verdict = _rescored(claimed, sampling, req, result, verifier_offer)
    counted = (result.rescore.get("meta") or {}).get("prompt_tokens")
    billed = claimed.get("prompt_tokens")
    prefix = len(claimed.get("prefix_ids") or [])  # a continuing node's prompt holds the earlier segments
    if counted is not None and billed is not None and billed > int(counted) + prefix + PROMPT_TOKEN_SLACK:
        verdict.passed = False  # the node billed more prompt tokens than the prompt has
        verdict.reasons.append("prompt_overbilled")
        verdict.limits["prompt_tokens"] = {"billed": billed, "counted": int(counted)}
    return verdict


def _rescored(claimed, sampling, req: InferenceRequest, result: VerifyResult, verifier_offer: NodeOffer | None):
    return verify_rescored(
        claimed["ids"], [q / LOGPROB_SCALE for q in claimed["logprobs_q"]], result.rescore, sampling,
        model=req.model, node_dtype=claimed.get("dtype"), node_quantization=claimed.get("quantization"),
        verifier_dtype=verifier_offer.dtype if verifier_offer else "float32",
        finish_reason=claimed.get("finish_reason"), eos_ids=result.rescore.get("meta", {}).get("eos_ids", ()),
        has_stop_strings=bool(sampling.get("stop")), receipt_tokens=len(claimed["ids"]),
        max_tokens=_segment_max_tokens(sampling.get("max_tokens"), len(claimed.get("prefix_ids") or [])))


def _segment_max_tokens(max_tokens: int | None, prefix: int) -> int | None:
    return None if max_tokens is None else max(0, int(max_tokens) - prefix)


def _lock_nodes(session: Session, ids: set[str]) -> dict[str, Node]:
    rows = session.exec(select(Node).where(col(Node.id).in_(sorted(ids))).order_by(col(Node.id))
                        .with_for_update().execution_options(populate_existing=True)).all()
    return {n.id: n for n in rows}


def _count(session: Session, node: Node, passed: bool, settings: CoordinatorSettings) -> dict:
    """The verdict in the node's record: counters, reputation, the ban after repeated failures."""
    if passed:
        node.audits_passed += 1
        node.passes_since_failure += 1
    else:
        node.audits_failed += 1
        node.passes_since_failure = 0
    rep = update_reputation(node.reputation, node.audits_failed, passed, REPUTATION)
    node.reputation, node.banned = rep.reputation, node.banned or rep.banned
    session.add(node)
    return {"reputation": rep.reputation, "banned": node.banned, "reason": rep.reason,
            "audit_rate_now": audit_rate(node, settings)}


def rerun_verdicts_of(session: Session, banned: Node) -> list[int]:
    """A banned node's word counts for nothing: the audits it passed are judged again by other
    verifiers (the pass it gave is taken back from the audited node's record), and
    confirmations its failing verdicts set off start over."""
    rerun = []
    passed = session.exec(select(Audit).where(Audit.verifier_id == banned.id, Audit.status == AuditStatus.PASSED)
                          .with_for_update()).all()
    for a in passed:
        audited = session.get(Node, a.node_id, with_for_update=True)
        if audited is not None:
            audited.audits_passed = max(0, audited.audits_passed - 1)
            audited.passes_since_failure = max(0, audited.passes_since_failure - 1)
            session.add(audited)
        a.evidence = {"superseded": {"verifier_id": banned.id, "verdict": a.verdict, "reason": "verifier banned"}}
        a.status, a.verifier_id, a.verdict, a.resolved_at, a.sent_at = AuditStatus.PENDING, None, None, None, None
        session.add(a)
        rerun.append(a.id)
    for a in session.exec(select(Audit).where(col(Audit.status).in_((AuditStatus.PENDING, AuditStatus.SENT)))
                          .with_for_update()).all():
        if (a.evidence or {}).get("first", {}).get("verifier_id") == banned.id:
            a.evidence = {"superseded": {"first": a.evidence["first"], "reason": "verifier banned"}}
            a.status, a.verifier_id, a.sent_at = AuditStatus.PENDING, None, None
            session.add(a)
            rerun.append(a.id)
    return rerun


def _own_part(result: VerifyResult, prefix: int) -> VerifyResult:
    """The verifier rescored the earlier segments too (the context of this one): keep the
    per-token arrays of the audited segment only."""
    if not prefix:
        return result
    rescore = {k: (v[prefix:] if isinstance(v, list) else v) for k, v in result.rescore.items()}
    return result.model_copy(update={"rescore": rescore})


def _fail_segment(session: Session, req: InferenceRequest, audit: Audit, settings: CoordinatorSettings) -> int:
    """A failed segment of a failed-over request: priced at zero while the request is not
    paid; once paid, what the buyer paid for it is the refund. Other segments stand."""
    if req.status == RequestStatus.COMPLETED:
        parts = charged_parts(session, req, settings.platform_fee_bps)
        return parts[audit.segment] if audit.segment < len(parts) else 0
    if not req.status.finished:
        void_segment(req, audit.segment)
        session.add(req)
    return 0


def _segment_value(audit: Audit) -> int:
    """What a segment is worth at its node's locked price (charged or not): sizes the slash."""
    c = audit.claimed
    prompt = (c.get("prompt_tokens") or 0) if audit.segment == 0 else 0
    return request_cost(prompt, len(c["ids"]), int(c.get("price_in") or 0), int(c.get("price_out") or 0))


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
                  offer: NodeOffer | None, round_: int) -> int:
    """The verifier's prefill (prompt + claimed tokens) at its own input price, from fees."""
    verifier = session.get(Node, verifier_id)
    tokens = (req.prompt_tokens or req.prompt_tokens_est or 0) + len(audit.claimed.get("prefix_ids") or []) \
        + len(audit.claimed["ids"])
    fee = request_cost(tokens, 0, offer.price_in if offer else 0, 0)
    if verifier is None or fee == 0:
        return 0
    key = f"verify-fee:{audit.id}:{round_}:{verifier_id[:16]}"
    return Ledger(session).pay_from_platform(verifier.earnings_account_id, fee, kind="verify",
                                             idempotency_key=key, request_ref=req.id)
