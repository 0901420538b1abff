"""Canary requests: the coordinator buys a job from each node now and then, itself.

A canary looks like any other request to the node (a plain completion at the node's
price, paid normally), but it is always audited: it checks the model fingerprint (the
verifier's rescoring), the claimed speed (the coordinator times the stream like any other)
and the context length (its prompt fills a good part of the advertised context). The
platform funds the canary buyer from outside, so the books stay double-entry.
"""

from __future__ import annotations

import random
from datetime import timedelta

from sqlmodel import Session, select

from coordinator.admission import new_request_id
from coordinator.frames import assignment_frame
from coordinator.models import Account, InferenceRequest, Node, NodeOffer, RequestStatus
from coordinator.models.account import utcnow
from coordinator.node_registry import is_live
from coordinator.settings import CoordinatorSettings
from pricing.ledger import AccountKind, Ledger
from pricing.money import request_cost

CANARY_ACCOUNT = "acct_canary"
CANARY_MAX_TOKENS = 32
_WORDS = ("market", "token", "river", "stone", "light", "number", "garden", "signal", "paper", "window",
          "engine", "silver", "morning", "bridge", "letter", "orange", "forest", "circle", "music", "harbor")


def canary_prompt(max_context: int, seed: int) -> str:
    """Words filling about half the advertised context (a byte bounds a token from above)."""
    rng = random.Random(seed)
    budget = max(64, max_context // 2)
    words, size = [], 0
    while size < budget:
        w = rng.choice(_WORDS)
        words.append(w)
        size += len(w) + 1
    return " ".join(words)


def _canary_account(session: Session) -> Account:
    account = session.get(Account, CANARY_ACCOUNT)
    if account is None:
        ledger_account = Ledger(session).open_account(AccountKind.BUYER, ref=CANARY_ACCOUNT)
        account = Account(id=CANARY_ACCOUNT, name="coordinator canaries", ledger_account_id=ledger_account.id)
        session.add(account)
        session.flush()
    return account


def due_nodes(session: Session, settings: CoordinatorSettings) -> list[tuple[Node, NodeOffer]]:
    if settings.canary_interval_s <= 0:
        return []
    cutoff = utcnow() - timedelta(seconds=settings.canary_interval_s)
    rows = session.exec(select(Node, NodeOffer).join(NodeOffer, NodeOffer.node_id == Node.id)).all()
    out, seen = [], set()
    for node, offer in rows:
        if node.id in seen or node.verify_only or not is_live(node, settings):
            continue
        if (node.last_canary_at or node.registered_at) < cutoff:  # new nodes are audited anyway
            seen.add(node.id)
            out.append((node, offer))
    return out


def create_canary(session: Session, node: Node, offer: NodeOffer) -> InferenceRequest:
    """A canary request, already assigned to `node` at its price (bypassing routing)."""
    account = _canary_account(session)
    rid = new_request_id()
    prompt = canary_prompt(offer.max_context - CANARY_MAX_TOKENS, seed=hash(rid) & 0xFFFF)
    prompt_est = len(prompt.encode()) + 2
    hold_amount = request_cost(prompt_est, CANARY_MAX_TOKENS, offer.price_in, offer.price_out)
    ledger = Ledger(session)
    if hold_amount:
        ledger.deposit(account.ledger_account_id, hold_amount, idempotency_key=f"canary-fund:{rid}")
    req = InferenceRequest(
        id=rid, account_id=account.id, model=offer.model, kind="completion",
        payload={"prompt": prompt, "canary": True, "sampling": {
            "max_tokens": CANARY_MAX_TOKENS, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop": []}},
        prompt_tokens_est=prompt_est, max_tokens=CANARY_MAX_TOKENS, hold_amount=hold_amount,
        status=RequestStatus.ASSIGNED, node_id=node.id, price_in=offer.price_in, price_out=offer.price_out,
        assigned_at=utcnow(),
    )
    session.add(req)
    session.flush()
    if hold_amount:
        req.hold_id = ledger.create_hold(account.ledger_account_id, hold_amount, idempotency_key=f"hold:{rid}",
                                         request_ref=rid).id
    node.last_canary_at = utcnow()
    session.add_all([req, node])
    return req


def send_canaries(rt) -> list[str]:
    """Create and send the canaries that are due; returns their request ids."""
    sent = []
    with rt.session() as s:
        frames = []
        for node, offer in due_nodes(s, rt.settings):
            req = create_canary(s, node, offer)
            frames.append((node.id, assignment_frame(req)))
            sent.append(req.id)
    for node_id, frame in frames:
        rt.bus.publish_sync(f"node:{node_id}", frame)
    return sent
