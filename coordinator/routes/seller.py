"""Seller routes, authenticated by the node's own signature (no API key): earnings,
stake and statement, payout requests, stake unbonding."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta, timezone

from fastapi import APIRouter, Depends
from sqlalchemy import func
from sqlmodel import col, select
from starlette.concurrency import run_in_threadpool

from coordinator.coach import coach
from coordinator.errors import Conflict, InsufficientBalance
from coordinator.models import Audit, AuditStatus, InferenceRequest, Node
from coordinator.models.account import utcnow
from coordinator.routes.deps import runtime, verify_signed
from coordinator.runtime import Runtime
from protocol import AccountQuery, PayoutRequest, UnbondRequest
from pricing.errors import IdempotencyConflict, InsufficientFunds
from pricing.ledger import AccountKind, Ledger, LedgerTransfer
from pricing.ledger_models import LedgerIdempotency
from pricing.stake import Stake
from pricing.statement import statement

router = APIRouter(prefix="/v1/nodes/me", tags=["sellers"])


def stake_frozen_because(s, node: Node, settings) -> str | None:
    """Stake cannot start unbonding while it may still have to pay: a banned node, one with
    audits not yet judged, or one whose last job is inside the challenge window."""
    if node.banned:
        return "the node is banned: its stake is frozen"
    open_audits = s.exec(select(func.count()).select_from(Audit).where(
        Audit.node_id == node.id, col(Audit.status).in_((AuditStatus.PENDING, AuditStatus.SENT)))).one()
    if open_audits:
        return f"{open_audits} audit(s) of this node are not judged yet"
    last = s.exec(select(func.max(InferenceRequest.finished_at)).where(InferenceRequest.node_id == node.id)).one()
    if last is not None and _aware(last) > utcnow() - timedelta(seconds=settings.challenge_window_s):
        return "the node's last job is inside the challenge window; audits may still claw back"
    return None


def _aware(t):
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def stake_account(ledger: Ledger, node_id: str) -> int:
    return ledger.open_account(AccountKind.SELLER_STAKE, ref=f"node:{node_id}").id


def in_challenge_window(s, earnings_account_id: int, window_s: float) -> int:
    """Earnings credited within the challenge window: an audit may still claw them back,
    so they cannot be paid out yet."""
    since = utcnow() - timedelta(seconds=window_s)
    return int(s.exec(select(func.coalesce(func.sum(LedgerTransfer.amount), 0)).where(
        LedgerTransfer.credit_account_id == earnings_account_id, LedgerTransfer.kind == "earning",
        LedgerTransfer.created_at >= since)).one())


@router.post("/account")
async def my_account(q: AccountQuery, rt: Runtime = Depends(runtime)):
    await run_in_threadpool(verify_signed, rt, q)

    def _do():
        with rt.session() as s:
            node = s.get(Node, q.node_id)
            ledger = Ledger(s)
            stake = Stake(ledger)
            stake_id = stake_account(ledger, node.id)
            page = statement(s, node.earnings_account_id, limit=q.limit, before=q.before)
            held = in_challenge_window(s, node.earnings_account_id, rt.settings.challenge_window_s)
            return {
                "node_id": node.id,
                "earnings_nano_usd": page.balance,
                "available_for_payout_nano_usd": max(0, page.balance - held),
                "stake_bonded_nano_usd": stake.bonded(stake_id),
                "stake_unbonding_nano_usd": stake.unbonding(stake_id),
                "statement": [asdict(e) for e in page.entries],
                "next_cursor": page.next_cursor,
            }

    return await run_in_threadpool(_do)


@router.post("/payouts")
async def request_payout(req: PayoutRequest, rt: Runtime = Depends(runtime)):
    await run_in_threadpool(verify_signed, rt, req)

    def _do():
        with rt.session() as s:
            node = s.get(Node, req.node_id)
            ledger = Ledger(s)
            key = f"payout:{node.id}:{req.idempotency_key}"
            held = in_challenge_window(s, node.earnings_account_id, rt.settings.challenge_window_s)
            available = ledger.balance(node.earnings_account_id) - held
            replay = s.get(LedgerIdempotency, key) is not None  # a replay returns the first answer
            if not replay and req.amount > available:
                raise InsufficientBalance(
                    f"{max(available, 0)} nano-USD of your earnings can be paid out now; {held} earned in the "
                    f"last {rt.settings.challenge_window_s:.0f}s stay until audits can no longer claw them back")
            try:
                balance = ledger.payout(node.earnings_account_id, req.amount, idempotency_key=key,
                                           destination_ref=req.destination)
            except InsufficientFunds as exc:
                raise InsufficientBalance(f"earnings {exc.available} nano-USD are short of {exc.needed}") from exc
            except IdempotencyConflict as exc:
                raise Conflict(str(exc), code="idempotency_conflict") from exc
            return {"node_id": node.id, "paid_nano_usd": req.amount, "earnings_nano_usd": balance}

    return await run_in_threadpool(_do)


@router.post("/unbond")
async def unbond(req: UnbondRequest, rt: Runtime = Depends(runtime)):
    await run_in_threadpool(verify_signed, rt, req)

    def _do():
        with rt.session() as s:
            node = s.get(Node, req.node_id)
            frozen = stake_frozen_because(s, node, rt.settings)
            if frozen:
                raise Conflict(f"stake cannot be unbonded now: {frozen}", code="stake_frozen")
            ledger = Ledger(s)
            try:
                row = Stake(ledger, rt.stake_policy).request_unbond(
                    stake_account(ledger, node.id), req.amount,
                    idempotency_key=f"unbond:{node.id}:{req.idempotency_key}")
            except InsufficientFunds as exc:
                raise InsufficientBalance(f"bonded stake {exc.available} nano-USD is short of {exc.needed}") from exc
            except IdempotencyConflict as exc:
                raise Conflict(str(exc), code="idempotency_conflict") from exc
            return {"node_id": node.id, "unbonding_nano_usd": row.amount, "matures_at": row.matures_at}

    return await run_in_threadpool(_do)


@router.post("/coach")
async def my_coach(q: AccountQuery, rt: Runtime = Depends(runtime)):
    """Where this node stands and what price would fill it (`coordinator/coach.py`); the same
    report as its dashboard page, for `agora node coach`."""
    await run_in_threadpool(verify_signed, rt, q)

    def _do():
        with rt.read_session() as s:
            return coach(s, rt.settings, q.node_id)

    return await run_in_threadpool(_do)
