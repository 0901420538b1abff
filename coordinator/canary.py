"""Canary requests: the coordinator buys a job from each node now and then, itself.

A canary looks like any other request to the node: drawn from a pool of buyer-like
requests (chat or completion, languages, lengths, greedy or sampled, the usual max_tokens),
at the node's price, with an ordinary request id, paid normally. It is always audited: it
checks the model fingerprint (the verifier's rescoring), the claimed speed (the coordinator
times it like any other stream) and now and then the context length (a long prompt). A node
gets one on every (re)connect (a restart may have swapped its checkpoint) and every
`canary_interval_s`. The platform funds the canary buyer from outside, so the books stay
double-entry.
"""

from __future__ import annotations

import random
import secrets
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
CANARY_MAX_TOKENS = 256  # the most a canary asks for; each draws its own from a buyer-like spread

# A pool of buyer-like requests: chats and completions in several languages and registers,
# short and long, greedy and sampled, with the max_tokens buyers send. A canary is drawn from
# it with fresh randomness, so a node cannot tell it from a buyer's job by what it sees.
_OPENERS = (
    "Summarise the following notes for a colleague:", "Translate into French:", "Explain like I'm five:",
    "Write a short poem about", "Fix the bug in this function:", "What is the capital of", "Give three ideas for",
    "Résume ce texte en deux phrases :", "Erkläre kurz, warum", "¿Cuál es la diferencia entre", "用一句话解释",
    "Continue the story:", "List the steps to", "Write an email declining", "Compare the following two options:",
)
_FILLER = (
    "the quarterly numbers look better than expected", "a river runs through the old town", "def add(a, b): return a - b",
    "the meeting moved to Thursday", "photosynthesis in plants", "the train leaves at nine", "a cat that learned to read",
    "la vie est belle au printemps", "das Wetter ist heute schön", "el mercado abre temprano", "机器学习的基本原理",
    "shipping costs rose by twelve percent", "the sea is wide and deep", "a recipe for lentil soup",
)
_SAMPLING = ((0.0, 1.0, 0), (0.0, 1.0, 0), (0.7, 0.9, 0), (1.0, 1.0, 0), (0.8, 0.95, 40))
_MAX_TOKENS = (16, 32, 64, 64, 128, 256)


def canary_request(max_context: int, rng: random.Random) -> dict:
    """A buyer-like request: kind, messages or prompt, sampling and max_tokens drawn from the
    pool; now and then a long one (up to half the advertised context) to check the context."""
    long = rng.random() < 0.2
    budget = rng.randint(max(64, max_context // 4), max(64, max_context // 2)) if long else rng.randint(8, 400)
    words, size = [rng.choice(_OPENERS)], 0
    while size < budget:
        w = rng.choice(_FILLER)
        words.append(w)
        size += len(w.encode()) + 1
    text = " ".join(words)
    temperature, top_p, top_k = rng.choice(_SAMPLING)
    max_tokens = min(rng.choice(_MAX_TOKENS), max(1, max_context - size))
    sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "seed": rng.randrange(2**31) if temperature and rng.random() < 0.3 else None, "stop": []}
    if rng.random() < 0.7:
        return {"kind": "chat", "messages": [{"role": "user", "content": text}], "sampling": sampling,
                "prompt_bytes": size + 40}
    return {"kind": "completion", "prompt": text, "sampling": sampling, "prompt_bytes": size + 2}


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
    draw = canary_request(offer.max_context, random.Random(secrets.randbits(64)))
    prompt_est, max_tokens = draw.pop("prompt_bytes"), draw["sampling"]["max_tokens"]
    hold_amount = request_cost(prompt_est, max_tokens, offer.price_in, offer.price_out)
    ledger = Ledger(session)
    if hold_amount:
        ledger.deposit(account.ledger_account_id, hold_amount, idempotency_key=f"canary-fund:{rid}")
    payload = {"canary": True, "sampling": draw["sampling"]}
    payload.update({k: draw[k] for k in ("messages", "prompt") if k in draw})
    req = InferenceRequest(
        id=rid, account_id=account.id, model=offer.model, kind=draw["kind"], payload=payload,
        prompt_tokens_est=prompt_est, max_tokens=max_tokens, hold_amount=hold_amount,
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
