"""A seller's appeal of a failed audit: the job is judged again by yet another verifier.

A node sees each of its audits with both log-prob vectors (`/v1/nodes/me/audits`); for a
failed one it may ask, once per audit and within `reverify_window_s` of the verdict, for a
re-verification (`POST /v1/nodes/me/audits/reverify`, signed by the node). The audit goes
back to the queue with the earlier verifiers and their operators excluded, to the
operator's trusted verifier where one is live:

- A failing verdict upholds the penalty (nothing more moves).
- A passing verdict from a trusted verifier overturns it; an ordinary verifier's pass needs
  a second independent pass (a single ordinary verifier can neither penalise nor acquit).
- Overturned: the audit counts as passed (counters and reputation restored, a ban lifted
  when nothing else holds it), the platform makes the node whole for everything the verdict
  took — earnings clawed back, stake slashed, the pay of a job it voided — and every
  verifier that failed the job loses reputation and stake like a contradicted first
  verifier. The buyer keeps its refund: the platform pays for its verifiers' mistake.
"""

from __future__ import annotations

from datetime import timedelta, timezone

from sqlmodel import Session

from coordinator.models import Audit, AuditStatus, Node
from coordinator.models.account import utcnow
from coordinator.penalties import FALSE_VERDICT_FACTOR, punish_false_verdict
from coordinator.settings import CoordinatorSettings
from pricing.ledger import Ledger
from scheduler.audit import ReputationPolicy

REPUTATION = ReputationPolicy()


class AppealRefused(Exception):
    """The audit cannot be re-verified (not the node's, not failed, already appealed, too late)."""

    def __init__(self, message: str, code: str, status: int = 409):
        super().__init__(message)
        self.code, self.status = code, status


def request(session: Session, node_id: str, audit_id: int, settings: CoordinatorSettings) -> Audit:
    """Queue a re-verification of `node_id`'s failed audit (the caller dispatches it)."""
    audit = session.get(Audit, audit_id, with_for_update=True)
    if audit is None or audit.node_id != node_id:  # someone else's audit is not found either
        raise AppealRefused(f"no audit {audit_id} of this node", "not_found", 404)
    if (audit.evidence or {}).get("reverify"):
        raise AppealRefused(f"audit {audit_id} was already re-verified or is being re-verified", "already_appealed")
    if audit.status != AuditStatus.FAILED:
        raise AppealRefused(f"audit {audit_id} is {audit.status.value}: only a failed audit can be re-verified",
                            "not_failed")
    if audit.resolved_at and utcnow() - _aware(audit.resolved_at) > timedelta(seconds=settings.reverify_window_s):
        raise AppealRefused(f"audit {audit_id} was judged more than {settings.reverify_window_s:.0f}s ago",
                            "appeal_window_closed")
    failing = [v for v in ((audit.evidence or {}).get("first", {}).get("verifier_id"), audit.verifier_id) if v]
    operators = [n.operator or n.id for n in (session.get(Node, v) for v in failing) if n is not None]
    audit.evidence = {**(audit.evidence or {}), "reverify": {
        "requested_at": utcnow().isoformat(), "upheld_verdict": audit.verdict, "failing_verifiers": failing,
        "exclude": sorted(set(failing + operators)), "passes": []}}
    audit.status, audit.verifier_id, audit.sent_at = AuditStatus.PENDING, None, None
    session.add(audit)
    return audit


def _aware(ts):
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def on_verdict(session: Session, audit: Audit, verdict: dict, verifier: Node, trusted: bool,
               nodes: dict[str, Node], settings: CoordinatorSettings) -> None:
    """A re-verification's verdict: uphold, ask for a second pass, or overturn."""
    appeal = dict(audit.evidence["reverify"])
    if not verdict["passed"]:
        appeal["outcome"] = "upheld"
        appeal["verdict"] = {**verdict, "verifier_id": verifier.id}
        audit.status, audit.resolved_at = AuditStatus.FAILED, utcnow()
        audit.evidence = {**audit.evidence, "reverify": appeal}
        session.add(audit)
        return
    appeal["passes"] = [*appeal["passes"], {"verifier_id": verifier.id, "trusted": trusted}]
    appeal["exclude"] = sorted(set(appeal["exclude"]) | {verifier.id, verifier.operator or verifier.id})
    if not trusted and len(appeal["passes"]) < 2:  # one ordinary verifier cannot acquit alone
        audit.status, audit.verifier_id, audit.sent_at = AuditStatus.PENDING, None, None
        audit.evidence = {**audit.evidence, "reverify": appeal}
        session.add(audit)
        return
    appeal["outcome"] = "overturned"
    appeal["restored"] = _overturn(session, audit, nodes, settings)
    audit.status, audit.resolved_at, audit.verdict = AuditStatus.PASSED, utcnow(), verdict
    audit.evidence = {**audit.evidence, "reverify": appeal}
    session.add(audit)


def _overturn(session: Session, audit: Audit, nodes: dict[str, Node], settings: CoordinatorSettings) -> dict:
    node = nodes[audit.node_id]
    took = audit.consequences or {}
    node.audits_failed = max(0, node.audits_failed - 1)
    node.audits_passed += 1
    node.reputation = min(1.0, node.reputation / REPUTATION.fail_factor)
    lifted = node.banned and node.audits_failed < REPUTATION.max_failures and node.reputation >= REPUTATION.ban_below
    if lifted:
        node.banned = False
    session.add(node)
    owed = int(took.get("clawed_back_nano_usd", 0)) + int(took.get("slashed_nano_usd", 0)) \
        + int(took.get("voided_pay_nano_usd", 0))
    paid = Ledger(session).compensate(node.earnings_account_id, owed, idempotency_key=f"overturn:{audit.id}",
                                      request_ref=audit.request_id) if owed else 0
    punished = []
    for vid in audit.evidence["reverify"]["failing_verifiers"]:
        wrong = nodes.get(vid) or session.get(Node, vid, with_for_update=True)
        if wrong is not None:
            punished.append(punish_false_verdict(session, wrong, audit, settings))
    return {"compensated_nano_usd": paid, "reputation": node.reputation, "ban_lifted": lifted,
            "verifiers_punished": punished, "false_verdict_factor": FALSE_VERDICT_FACTOR}
