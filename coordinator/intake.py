"""A buyer's request enters the market: its `n` choices admitted, routed, held and placed
in one transaction — the only database write before its first token.

Per choice: the request row (`admission.admit`), the route the policy gives it now
(`placement.choose`, no lock), then for all choices the escrow holds (the buyer's ledger
row), then each node's slot (`placement.claim`, the node's lock): locks last, held the
shortest, all committed together. The hold is tried at the prices of every offer without
reading the balance first; only a buyer it does not cover pays a second try, narrowed to
the offers it can afford (`admission.reprice`), and is routed again among those.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from coordinator.admission import Admitted, admit, find_keyed, place_hold, reprice
from coordinator.errors import InsufficientBalance
from coordinator.models import Account, InferenceRequest
from coordinator.placement import choose, claim
from coordinator.runtime import Runtime
from coordinator.schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)
T = TypeVar("T")


def admit_and_place(rt: Runtime, account: Account, body: ChatCompletionRequest | CompletionRequest, kind: str,
                    rids: list[str], idempotency_key: str | None
                    ) -> tuple[list[InferenceRequest], bool, list[str | None]]:
    """(requests, whether they are a replay of `idempotency_key`'s, node each was placed
    on or None: it waits for a dispatch round). Raises the buyer's errors (no model, no
    capacity, balance short: nothing is written)."""
    with rt.session() as s:
        if idempotency_key:
            prior = find_keyed(s, account, idempotency_key)
            if prior is not None:
                return [prior], True, []
        admitted: list[Admitted] = []
        nodes: list[str | None] = []
        for k, rid in enumerate(rids):  # only the first choice carries the Idempotency-Key
            a = admit(s, account, body, kind, rt.settings, idempotency_key if k == 0 else None, request_id=rid,
                      replica_id=rt.replica_id, view=rt.market, hold=False, optimistic=True)
            admitted.append(a)
            nodes.append(_route(rt, s, a.request, rids))
        for k, a in enumerate(admitted):  # every choice is held, or none is
            try:
                _hold(rt, s, account, a, nodes, k, rids)
            except InsufficientBalance as exc:
                if len(rids) == 1:
                    raise
                reqs = [x.request for x in admitted]
                total = sum(r.hold_amount for r in reqs)
                balance = exc.__cause__.available + sum(r.hold_amount for r in reqs[:k])
                raise InsufficientBalance(f"balance {balance} nano-USD is short of the {total} nano-USD these "
                                          f"{len(rids)} choices may cost (max_tokens={a.request.max_tokens} each); "
                                          "top up, lower max_tokens or n") from exc
        for k, a in enumerate(admitted):
            if nodes[k] is not None and not _step(s, a.request, lambda: claim(s, a.request, nodes[k], rt.settings)):
                nodes[k] = None
        return [a.request for a in admitted], False, nodes


def _route(rt: Runtime, s: Session, req: InferenceRequest, rids: list[str]) -> str | None:
    if not rt.settings.inline_dispatch:
        return None
    return _step(s, req, lambda: choose(s, req, rt.settings, rt.market, getattr(rt, "affinity", None), siblings=rids))


def _hold(rt: Runtime, s: Session, account: Account, a: Admitted, nodes: list[str | None], k: int,
          rids: list[str]) -> None:
    """Choice `k`'s hold at its optimistic price; where the balance falls short of it, once
    more at the prices of the offers the balance covers, routed again among those."""
    try:
        place_hold(s, account, a.request, rt.settings)
    except InsufficientBalance as exc:  # nothing was moved: the conditional update matched no row
        if not reprice(a.request, a.offers or [], exc.__cause__.available):
            raise
        nodes[k] = _route(rt, s, a.request, rids)
        place_hold(s, account, a.request, rt.settings)


def _step(s: Session, req: InferenceRequest, step: Callable[[], T]) -> T | None:
    """A placement step (`placement.py`). On PostgreSQL in a savepoint: a lock timeout
    leaves the request queued for a dispatch round. SQLite's write lock, held by this
    transaction from its start, leaves nothing to time out."""
    if s.get_bind().dialect.name != "postgresql":
        return step()
    try:
        with s.begin_nested():
            return step()
    except OperationalError as exc:
        log.debug("request %s not placed at admission: %s", req.id, exc)
        return None
