"""Disputes: audits with their evidence, for the operator (admin token) and for the seller
(its node's signature); the cheating economics of a node, for the operator."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query
from sqlmodel import select
from starlette.concurrency import run_in_threadpool

from coordinator import reverification
from coordinator.audits import economics
from coordinator.auth import require_admin
from coordinator.errors import Conflict, NotFound
from coordinator.models import Audit, AuditStatus, Node
from coordinator.routes.deps import runtime, verify_signed
from coordinator.routes.seller import stake_account
from coordinator.runtime import Runtime
from protocol import AccountQuery, ReverifyRequest
from pricing.ledger import Ledger

router = APIRouter(tags=["audits"])


def _public(a: Audit, evidence: bool) -> dict:
    out = {"id": a.id, "request_id": a.request_id, "segment": a.segment, "node_id": a.node_id,
           "verifier_id": a.verifier_id,
           "status": a.status.value, "verdict": a.verdict, "consequences": a.consequences,
           "created_at": a.created_at, "resolved_at": a.resolved_at}
    if evidence:
        out["evidence"] = a.evidence
    return out


@router.get("/admin/audits", dependencies=[Depends(require_admin)])
async def list_audits(status: AuditStatus | None = None, node_id: str | None = None,
                      evidence: bool = False, limit: int = Query(100, ge=1, le=1000),
                      rt: Runtime = Depends(runtime)):
    def _do():
        with rt.session() as s:
            q = select(Audit).order_by(Audit.id.desc()).limit(limit)  # type: ignore[union-attr]
            if status is not None:
                q = q.where(Audit.status == status)
            if node_id is not None:
                q = q.where(Audit.node_id == node_id)
            return [_public(a, evidence) for a in s.exec(q).all()]

    return await run_in_threadpool(_do)


@router.post("/v1/nodes/me/audits")
async def my_audits(q: AccountQuery, rt: Runtime = Depends(runtime)):
    """A seller's own audits (pending, awaiting a second opinion, passed, failed, expired),
    with both log-prob vectors as evidence, and the first verdict where one was confirmed."""

    await run_in_threadpool(verify_signed, rt, q)


    def _do():

        with rt.session() as s:

            node = s.get(Node, q.node_id)
            rows = s.exec(select(Audit).where(Audit.node_id == node.id).order_by(Audit.id.desc())  # type: ignore[union-attr]
                          .limit(q.limit)).all()
            return {"node_id": node.id, "reputation": node.reputation, "banned": node.banned,
                    "audits": [_public(a, True) for a in rows]}

    return await run_in_threadpool(_do)


@router.post("/v1/nodes/me/audits/reverify")
async def appeal_audit(q: ReverifyRequest, rt: Runtime = Depends(runtime)):
    """A seller appeals one of its failed audits: other verifiers judge the job again (once per
    audit, within `reverify_window_s`); see `coordinator/reverification.py` for what follows."""
    await run_in_threadpool(verify_signed, rt, q)

    def _do():
        with rt.session() as s:
            try:
                audit = reverification.request(s, q.node_id, q.audit_id, rt.settings)
            except reverification.AppealRefused as exc:
                err = NotFound(str(exc)) if exc.status == 404 else Conflict(str(exc), code=exc.code)
                raise err from exc
            return audit.id

    audit_id = await run_in_threadpool(_do)
    sent = await run_in_threadpool(rt.dispatch_audit, audit_id)

    def _view():
        with rt.session() as s:
            return {**_public(s.get(Audit, audit_id), True), "verifier_assigned": sent}

    return await run_in_threadpool(_view)


@router.get("/admin/nodes/{node_id}/economics", dependencies=[Depends(require_admin)])
async def node_economics(node_id: str, rt: Runtime = Depends(runtime)):
    """Whether cheating has negative expected value for this node: its audit rate now × the
    slash the code takes for a caught job (capped by its stake) against its gain per job."""

    def _do():
        with rt.session() as s:
            node = s.get(Node, node_id)
            if node is None:
                raise NotFound(f"no node {node_id}")
            ledger = Ledger(s)
            return economics(s, node, ledger.balance(stake_account(ledger, node.id)), rt.settings)

    return await run_in_threadpool(_do)


@router.post("/admin/nodes/{node_id}/trust", dependencies=[Depends(require_admin)])
async def trust_node(node_id: str, trusted: bool = True, rt: Runtime = Depends(runtime)):
    """Mark a node as the operator's own verifier (its verdicts need no confirmation), or not."""

    def _do():
        with rt.session() as s:
            node = s.get(Node, node_id, with_for_update=True)
            if node is None:
                raise NotFound(f"no node {node_id}")
            node.trusted = trusted
            s.add(node)
            return {"node_id": node_id, "trusted": trusted}

    return await run_in_threadpool(_do)
