"""Routable offers held in memory, so that admitting a request does not load every node.

`routability.candidates` joins every offer with its node and checks each one: fine for a
dispatch round, too slow per request once thousands of sellers are connected. A
`MarketView` keeps the result per model:

- reloaded at once (by the next reader) after any commit in this process that changed
  something routing depends on (a node registered, connected or disconnected, was banned,
  excluded or backed off; an offer or its price changed): see `_watch` below;
- otherwise refreshed in a background thread once it is older than `ttl_s`, so readers
  never wait for a reload; changes made by other processes (a worker, another API
  replica) show within `ttl_s` plus one reload;
- a node backing off is kept aside and comes back by itself when its backoff ends.

A stale view can only offer a node that is no longer routable; `placement.place_now`
checks the chosen node's own row before it assigns anything, and a request it cannot place
goes to the dispatch round, which reads the database.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, select

from coordinator.db import read_scope
from coordinator.models import Node, NodeOffer
from coordinator.models.account import utcnow
from coordinator.routability import Candidate, candidates
from coordinator.settings import CoordinatorSettings

log = logging.getLogger(__name__)

# Columns whose change can make a node or offer routable or not: a commit that changes one
# reloads every view of this process. (Speed, reputation and round-trip figures only
# order the candidates: those refresh with the TTL.)
NODE_COLUMNS = ("online", "channel_connected", "banned", "backoff_until", "verify_only", "excluded_reason",
                "channel_id", "max_concurrency")
OFFER_COLUMNS = ("model", "price_in", "price_out", "token_ids", "logprobs", "max_context")

_generation = 0  # bumped by every such commit in this process
_gen_lock = threading.Lock()


def _bump() -> None:
    global _generation
    with _gen_lock:
        _generation += 1


def _touches_routing(obj) -> bool:
    cols = NODE_COLUMNS if isinstance(obj, Node) else OFFER_COLUMNS if isinstance(obj, NodeOffer) else None
    if cols is None:
        return False
    state = inspect(obj)
    if state.pending or state.deleted or not state.persistent:
        return True
    return any(state.attrs[c].history.has_changes() for c in cols)


@event.listens_for(OrmSession, "before_flush")
def _watch(session, _ctx, _instances) -> None:
    if not session.info.get("market_changed") and any(
            _touches_routing(o) for objs in (session.new, session.dirty, session.deleted) for o in objs):
        session.info["market_changed"] = True


@event.listens_for(OrmSession, "after_commit")
def _committed(session) -> None:
    if session.info.pop("market_changed", False):
        _bump()


@event.listens_for(OrmSession, "after_soft_rollback")
def _rolled_back(session, _previous) -> None:
    if not session.in_transaction():
        session.info.pop("market_changed", None)


@dataclass
class _Snapshot:
    generation: int
    loaded_at: float
    by_model: dict[str, list[Candidate]] = field(default_factory=dict)
    backing_off: dict[str, list[tuple[datetime, Candidate]]] = field(default_factory=dict)
    known: set[str] = field(default_factory=set)


class MarketView:
    def __init__(self, engine: Engine, settings: CoordinatorSettings):
        self.engine, self.settings = engine, settings
        self.ttl_s = settings.market_view_ttl_s
        self._snap: _Snapshot | None = None
        self._load_lock = threading.Lock()
        self._refreshing = False

    # ------------------------------------------------------------------ reading
    def candidates(self, model: str, *, allow_unverified: bool = False) -> list[Candidate]:
        """Routable offers of `model` (unverifiable ones only with `allow_unverified` where the
        operator allows them), like `routability.candidates`."""
        snap = self._current()
        rows = list(snap.by_model.get(model, ()))
        now = None
        for until, c in snap.backing_off.get(model, ()):
            now = now or utcnow()
            if until <= now:
                rows.append(c)
        ok = allow_unverified and self.settings.allow_unverified_nodes
        return rows if ok else [c for c in rows if c.offer.verifiable]

    def known(self, model: str) -> bool:
        """Whether any node has ever offered `model`."""
        return model in self._current().known

    def invalidate(self) -> None:
        _bump()

    # ------------------------------------------------------------------ loading
    def _current(self) -> _Snapshot:
        snap = self._snap
        if snap is None or snap.generation != _generation or self.ttl_s <= 0:
            with self._load_lock:  # reload now: this process changed routing (or nothing is loaded)
                snap = self._snap
                if snap is None or snap.generation != _generation or self.ttl_s <= 0:
                    snap = self._snap = self._load()
        elif time.monotonic() - snap.loaded_at > self.ttl_s and not self._refreshing:
            self._refreshing = True  # older than the TTL: reload in the background, serve this one
            threading.Thread(target=self._refresh, name="market-view", daemon=True).start()
        return snap

    def _refresh(self) -> None:
        try:
            with self._load_lock:
                self._snap = self._load()
        except Exception:  # noqa: BLE001 - the next reader tries again; the old view stays
            log.exception("reloading the market view failed")
        finally:
            self._refreshing = False

    def _load(self) -> _Snapshot:
        gen = _generation  # read first: a change committed while loading reloads again
        now = utcnow()
        with read_scope(self.engine) as s:
            live = candidates(s, self.settings, allow_unverified=True)
            known = set(s.exec(select(NodeOffer.model).distinct()).all())
            waiting = self._backing_off(s, now)
        snap = _Snapshot(gen, time.monotonic(), known=known)
        for c in live:
            snap.by_model.setdefault(c.offer.model, []).append(c)
        for until, c in waiting:
            snap.backing_off.setdefault(c.offer.model, []).append((until, c))
        return snap

    def _backing_off(self, s: Session, now: datetime) -> list[tuple[datetime, Candidate]]:
        """Offers of nodes that are routable but for a backoff that ends later."""
        from coordinator.routability import why_not_routable
        from pricing.stake import bonded_by_ref

        rows = s.exec(select(NodeOffer, Node).join(Node, Node.id == NodeOffer.node_id)
                      .where(Node.backoff_until > now)).all()
        stakes = bonded_by_ref(s, sorted({f"node:{n.id}" for _, n in rows})) if self.settings.min_stake else {}
        return [(n.backoff_until, Candidate(o, n)) for o, n in rows
                if why_not_routable(n, o, self.settings, stakes.get(f"node:{n.id}"), n.backoff_until) is None]
