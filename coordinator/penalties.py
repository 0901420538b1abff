"""What a caught cheater, and a verifier caught judging falsely, pay (all through the
ledger, idempotent per audit).

A failed audit refunds the buyer what the job cost it (from the node's earnings first, then
its stake, then — for the platform's fee, if those fell short — from the platform's fees) and slashes `slash` more of stake to the platform — sized by the caller with
`scheduler.audit.deterrent_slash` so cheating loses `slash_margin` times its gain at the
node's audit rate. A verifier whose failing verdict a confirmation contradicts loses
reputation and `min_slash_nano_usd` of stake.
"""

from __future__ import annotations

from sqlmodel import Session

from coordinator.models import Account, Audit, InferenceRequest, Node
from coordinator.settings import CoordinatorSettings
from pricing.errors import InsufficientFunds
from pricing.ledger import AccountKind, Ledger
from pricing.stake import Stake

FALSE_VERDICT_FACTOR = 0.5  # reputation × this per overturned verdict (like a failed audit)


def penalise(session: Session, req: InferenceRequest, node: Node, slash: int, *, refund: int | None = None,
             ref: str | None = None) -> dict:
    """Refund the buyer what the job cost it (`refund`, default the request's cost; a
    failed-over request's failed segment: what was paid for that segment), then slash
    `slash` of stake to the platform. `ref` keys the transfers (default the request id)."""
    ledger = Ledger(session)
    buyer = session.get(Account, req.account_id).ledger_account_id
    cost = (req.cost or 0) if refund is None else refund
    ref = ref or req.id
    clawed = 0
    for _ in range(3):  # a payout may land between reading the balance and locking it
        clawed = min(cost, ledger.balance(node.earnings_account_id))
        if not clawed:
            break
        try:
            ledger.clawback(node.earnings_account_id, buyer, clawed, idempotency_key=f"clawback:{ref}:{clawed}",
                            request_ref=req.id)
            break
        except InsufficientFunds:
            clawed = 0
    stake_id = ledger.open_account(AccountKind.SELLER_STAKE, ref=f"node:{node.id}").id
    owed = cost - clawed
    take = min(ledger.balance(stake_id), owed + slash)
    from_stake = 0
    if take > 0:
        from_stake = min(owed, take)
        result = Stake(ledger).slash(stake_id, take, to=[(buyer, from_stake)] if from_stake else [],
                                     idempotency_key=f"slash:{ref}", reason=req.id, allow_partial=True)
        take, from_stake = result.slashed, result.to_buyers
    from_fees = 0
    if cost - clawed - from_stake > 0:  # what the seller could not cover is the platform's fee on it: back too
        from_fees = ledger.refund_fee(buyer, cost - clawed - from_stake, idempotency_key=f"fee-refund:{ref}",
                                      request_ref=req.id)
    refunded = clawed + from_stake + from_fees
    return {"refunded_nano_usd": refunded, "clawed_back_nano_usd": clawed, "slashed_nano_usd": take,
            "fee_refunded_nano_usd": from_fees, "slash_wanted_nano_usd": slash, "buyer_made_whole": refunded == cost}


def punish_false_verdict(session: Session, verifier: Node, audit: Audit, settings: CoordinatorSettings) -> dict:
    """The confirmation contradicted this verifier's failing verdict: reputation halves
    (it stops qualifying as a verifier soon) and `min_slash_nano_usd` of its stake goes."""
    verifier.reputation *= FALSE_VERDICT_FACTOR
    verifier.verdicts_overturned += 1
    session.add(verifier)
    ledger = Ledger(session)
    stake_id = ledger.open_account(AccountKind.SELLER_STAKE, ref=f"node:{verifier.id}").id
    take = min(ledger.balance(stake_id), settings.min_slash_nano_usd)
    if take > 0:
        take = Stake(ledger).slash(stake_id, take, idempotency_key=f"false-verdict:{audit.id}:{verifier.id[:16]}",
                                   reason=audit.request_id, allow_partial=True).slashed
    return {"node_id": verifier.id, "reputation": verifier.reputation, "slashed_nano_usd": take,
            "verdicts_overturned": verifier.verdicts_overturned}
