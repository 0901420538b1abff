"""What a failed audit costs the node: the buyer gets the job's cost back, the stake is
slashed by a penalty on top, all through the ledger (idempotent per audited request)."""

from __future__ import annotations

from sqlmodel import Session

from coordinator.models import Account, InferenceRequest, Node
from coordinator.settings import CoordinatorSettings
from pricing.errors import InsufficientFunds
from pricing.ledger import AccountKind, Ledger
from pricing.stake import Stake


def penalise(session: Session, req: InferenceRequest, node: Node, settings: CoordinatorSettings,
             job_value: int | None = None) -> dict:
    """Refund the buyer what the job cost it (from the node's earnings first, then its
    stake) and slash `slash_multiple` × the job's value (`job_value`, else its cost; at
    least `min_slash_nano_usd`) of stake to the platform."""
    ledger = Ledger(session)
    buyer = session.get(Account, req.account_id).ledger_account_id
    cost = req.cost or 0
    clawed = 0
    for _ in range(3):  # a payout may land between reading the balance and locking it
        clawed = min(cost, ledger.balance(node.earnings_account_id))
        if not clawed:
            break
        try:
            ledger.clawback(node.earnings_account_id, buyer, clawed, idempotency_key=f"clawback:{req.id}:{clawed}",
                            request_ref=req.id)
            break
        except InsufficientFunds:
            clawed = 0
    stake_id = ledger.open_account(AccountKind.SELLER_STAKE, ref=f"node:{node.id}").id
    owed = cost - clawed
    penalty = max(settings.min_slash_nano_usd, settings.slash_multiple * (cost if job_value is None else job_value))
    slash = min(ledger.balance(stake_id), owed + penalty)
    from_stake = 0
    if slash > 0:
        from_stake = min(owed, slash)
        result = Stake(ledger).slash(stake_id, slash, to=[(buyer, from_stake)] if from_stake else [],
                                     idempotency_key=f"slash:{req.id}", reason=req.id, allow_partial=True)
        slash, from_stake = result.slashed, result.to_buyers
    return {"refunded_nano_usd": clawed + from_stake, "clawed_back_nano_usd": clawed,
            "slashed_nano_usd": slash, "buyer_made_whole": clawed + from_stake == cost}
