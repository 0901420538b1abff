"""Node identity and liveness: registration, signed heartbeats, replay protection.

Every signed message must (1) verify under the node's Ed25519 key, (2) carry a timestamp
within the signature window, and (3) use a nonce the node has not used before. A node id
is its public key, so a node cannot speak for another without that node's private key.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from coordinator.errors import APIError, BadRequest, Forbidden, InsufficientBalance, NotFound, Unauthorized
from coordinator.models import Node, NodeNonce, NodeOffer
from coordinator import speed
from coordinator.models.account import utcnow
from coordinator.settings import CoordinatorSettings
from protocol import Heartbeat, Registration, Signed
from pricing.ledger import AccountKind, Ledger
from pricing.stake import Stake
from scheduler.backoff import Backoff


class StaleMessage(Unauthorized):
    code = "stale_timestamp"


class ReplayedNonce(Unauthorized):
    code = "replayed_nonce"


class BadSignature(Unauthorized):
    code = "bad_signature"


class StakeTooLow(InsufficientBalance):
    code = "stake_below_minimum"


class PriceAboveCeiling(BadRequest):
    code = "price_above_ceiling"


def check_signed(session: Session, msg: Signed, settings: CoordinatorSettings) -> None:
    """Raise unless `msg` is authentic, fresh and not a replay; records its nonce."""
    if not msg.signature_valid():
        raise BadSignature("signature does not verify under the node's public key")
    skew = abs(time.time() - msg.timestamp)
    if skew > settings.signature_window_s:
        raise StaleMessage(
            f"timestamp is {skew:.0f}s away from the coordinator's clock "
            f"(window {settings.signature_window_s:.0f}s)"
        )
    if not (8 <= len(msg.nonce) <= 64):
        raise APIError("nonce must be 8..64 characters")
    try:
        with session.begin_nested():
            session.add(NodeNonce(node_id=msg.node_id, nonce=msg.nonce))
    except IntegrityError:
        raise ReplayedNonce("this nonce was already used: replayed message refused") from None


def prune_nonces(session: Session, settings: CoordinatorSettings) -> int:
    """Nonces older than twice the window can go: their messages would be stale anyway."""
    cutoff = utcnow() - timedelta(seconds=2 * settings.signature_window_s)
    result = session.exec(delete(NodeNonce).where(NodeNonce.seen_at < cutoff))  # type: ignore[call-overload]
    return result.rowcount or 0


def register(session: Session, reg: Registration, settings: CoordinatorSettings, *, verified: bool = False) -> Node:
    """Create or update the node `reg.node_id` and replace its offers (`verified`: the
    signature was checked, and its nonce burnt, already)."""
    if not verified:
        check_signed(session, reg, settings)
    node = session.get(Node, reg.node_id)
    if node is not None and node.banned:
        raise Forbidden("this node is banned from the market")
    for offer in reg.models:
        if offer.price_in > settings.max_price_in or offer.price_out > settings.max_price_out:
            raise PriceAboveCeiling(
                f"{offer.model}: prices {offer.price_in}/{offer.price_out} nano-USD per million tokens (in/out) "
                f"exceed this market's ceiling of {settings.max_price_in}/{settings.max_price_out}", param="models")
    if settings.min_stake and not reg.verify_only:
        ledger = Ledger(session)
        stake_id = ledger.open_account(AccountKind.SELLER_STAKE, ref=f"node:{reg.node_id}").id
        bonded = Stake(ledger).bonded(stake_id)
        if bonded < settings.min_stake:
            raise StakeTooLow(f"bonded stake {bonded} nano-USD is below the market's minimum "
                              f"{settings.min_stake}; ask the operator to record your stake deposit")
    if node is None:
        earnings = Ledger(session).open_account(AccountKind.SELLER_EARNINGS, ref=f"node:{reg.node_id}")
        node = Node(id=reg.node_id, earnings_account_id=earnings.id, region=reg.region,
                    max_concurrency=reg.max_concurrency)
    node.name = reg.name
    node.operator = reg.operator
    node.region = reg.region
    node.max_concurrency = reg.max_concurrency
    node.engine = reg.engine
    node.verify_only = reg.verify_only
    node.benchmark = reg.benchmark
    node.last_heartbeat_at = utcnow()
    node.online = True
    node.excluded_reason = None  # a (re)started agent gets another chance; failures back it off again
    session.add(node)
    old = {o.model: o for o in session.exec(select(NodeOffer).where(NodeOffer.node_id == node.id))}
    for offer in reg.models:
        row = old.pop(offer.model, None) or NodeOffer(node_id=node.id, model=offer.model, price_in=0,
                                                     price_out=0, tokens_per_s=offer.tokens_per_s)
        for field in ("price_in", "price_out", "tokens_per_s", "tokens_per_s_b1", "ttft_ms", "max_context", "dtype",
                      "quantization", "token_ids", "logprobs", "can_verify"):
            setattr(row, field, getattr(offer, field))
        speed.reseed(row)  # new claims re-seed the estimate; what traffic taught is kept
        session.add(row)
    for stale in old.values():
        session.delete(stale)
    session.flush()
    return node


def heartbeat(session: Session, hb: Heartbeat, settings: CoordinatorSettings, *, verified: bool = False) -> Node:
    node = session.get(Node, hb.node_id)
    if node is None:
        raise NotFound("unknown node: register first")
    if not verified:
        check_signed(session, hb, settings)
    if node.banned:
        raise Forbidden("this node is banned from the market")
    node.last_heartbeat_at = utcnow()
    node.online = True
    session.add(node)
    return node


def mark_silent_offline(session: Session, settings: CoordinatorSettings, now: datetime | None = None) -> list[str]:
    """Nodes whose last heartbeat is older than the timeout go offline; returns their ids."""
    cutoff = (now or utcnow()) - timedelta(seconds=settings.heartbeat_timeout_s)
    silent = session.exec(
        select(Node).where(Node.online == True, Node.last_heartbeat_at < cutoff)  # noqa: E712
    ).all()
    for node in silent:
        node.online = False
        session.add(node)
    return [n.id for n in silent]


def is_live(node: Node, settings: CoordinatorSettings, now: datetime | None = None) -> bool:
    """Online, connected, heard from recently, not banned and not backing off."""
    if not node.online or node.banned or not node.channel_connected or node.last_heartbeat_at is None:
        return False
    now = now or utcnow()
    if node.backoff_until is not None and now < node.backoff_until:
        return False
    return now - node.last_heartbeat_at <= timedelta(seconds=settings.heartbeat_timeout_s)


_BACKOFF = Backoff(base_s=2.0, factor=2.0, max_s=300.0)


ERROR_RATE_WEIGHT = 0.2  # EWMA weight of the newest job in Node.error_rate


def record_failure(node: Node, now: datetime | None = None, *, reason: str | None = None,
                   settings: CoordinatorSettings | None = None) -> str | None:
    """A job the node failed (an error it reported, a stalled or lost stream): it backs off
    exponentially before new work, its error rate rises and its reputation falls; after
    `error_exclusion_streak` failures in a row it is out of routing until it registers again.
    Returns the exclusion reason when this failure excluded it (to tell the node)."""
    node.failures += 1
    node.backoff_until = (now or utcnow()) + timedelta(seconds=_BACKOFF.delay_s(node.failures, node.id))
    node.error_rate = (1 - ERROR_RATE_WEIGHT) * node.error_rate + ERROR_RATE_WEIGHT
    streak = settings.error_exclusion_streak if settings else 3
    node.reputation *= settings.error_reputation_factor if settings else 0.9
    if node.failures >= streak and not node.excluded_reason:
        node.excluded_reason = (f"out of routing after {node.failures} failed jobs in a row"
                                f"{f' (last: {reason[:120]})' if reason else ''}; fix the engine and restart the agent")
        return node.excluded_reason
    return None


def record_success(node: Node) -> None:
    if node.failures or node.backoff_until is not None:
        node.failures, node.backoff_until = 0, None
    node.error_rate *= 1 - ERROR_RATE_WEIGHT
