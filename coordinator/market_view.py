"""Routable offers held in memory, so that admitting a request does not load every node.

`routability.candidates` joins every offer with its node and checks each one: fine for a
dispatch round, too slow per request once thousands of sellers are connected. A
`MarketView` keeps the result per model:

- a commit in this process that changes something routing depends on (a node registered,
  connected or disconnected, was banned, excluded or backed off; an offer or its price
  changed: `_watch` below) marks those nodes; the next reader reloads just them;
- the whole view is reloaded in a background thread once it is older than `ttl_s` (or
  ten times what the last reload took, whichever is longer: a large fleet's reload costs
  at most a tenth of a core), so readers never wait for it; changes made by other
  processes (a worker, another API replica) show within that time;
- a node backing off is kept aside and comes back by itself when its backoff ends.

A stale view can only offer a node that is no longer routable; `placement.place_now`
checks the chosen node's own row before it assigns anything, and a request it cannot place
goes to the dispatch round, which reads the database.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session as OrmSession
from sqlmodel import Session, col, select

from coordinator.db import read_scope
from coordinator.models import Node, NodeOffer
from coordinator.models.account import utcnow
from coordinator.routability import Candidate, candidates, why_not_routable
from coordinator.settings import CoordinatorSettings
from pricing.stake import bonded_by_ref

log = logging.getLogger(__name__)

# Columns whose change can make a node or offer routable or not. (Speed, reputation and
# round-trip figures only order the candidates: those refresh with the whole view.)
NODE_COLUMNS = ("online", "channel_connected", "banned", "backoff_until", "verify_only", "excluded_reason",
                "channel_id", "max_concurrency")
OFFER_COLUMNS = ("model", "price_in", "price_out", "token_ids", "logprobs", "max_context")
RELOAD_COST_SHARE = 0.1  # the background reload runs at most this share of the time
SLOW_RELOAD_S = 1.0  # a reload slower than this is logged (a large fleet: see bench/fleet.py)

_views: "weakref.WeakSet[MarketView]" = weakref.WeakSet()  # every view of this process


def mark_changed(node_ids) -> None:
    """These nodes changed in a way that matters to routing: every view reloads them."""
    for view in list(_views):
        view.mark(node_ids)


def _routing_change(obj) -> str | None:
    """The node id, if `obj` is a node or offer whose pending change matters to routing."""
    if isinstance(obj, Node):
        cols, node_id = NODE_COLUMNS, obj.id
    elif isinstance(obj, NodeOffer):
        cols, node_id = OFFER_COLUMNS, obj.node_id
    else:
        return None
    state = inspect(obj)
    if state.pending or state.deleted or not state.persistent:
        return node_id
    return node_id if any(state.attrs[c].history.has_changes() for c in cols) else None


@event.listens_for(OrmSession, "before_flush")
def _watch(session, _ctx, _instances) -> None:
    changed = {n for objs in (session.new, session.dirty, session.deleted) for o in objs
               if (n := _routing_change(o)) is not None}
    if changed:
        session.info.setdefault("market_changed", set()).update(changed)


@event.listens_for(OrmSession, "after_commit")
def _committed(session) -> None:
    changed = session.info.pop("market_changed", None)
    if changed:
        mark_changed(changed)


@event.listens_for(OrmSession, "after_soft_rollback")
def _rolled_back(session, _previous) -> None:
    if not session.in_transaction():
        session.info.pop("market_changed", None)


@dataclass
class _Snapshot:
    loaded_at: float
    by_model: dict[str, list[Candidate]] = field(default_factory=dict)
    backing_off: dict[str, list[tuple[datetime, Candidate]]] = field(default_factory=dict)
    known: set[str] = field(default_factory=set)
    listed: dict[tuple[str, bool], list[Candidate]] = field(default_factory=dict)  # (model, unverified ok)


class MarketView:
    def __init__(self, engine: Engine, settings: CoordinatorSettings):
        self.engine, self.settings = engine, settings
        self.ttl_s = settings.market_view_ttl_s
        self._snap: _Snapshot | None = None
        self._lock = threading.Lock()  # one loader at a time
        self._refreshing = False
        self._interval_s = self.ttl_s
        self._dirty: set[str] = set()  # nodes changed since they were last loaded
        self._dirty_lock = threading.Lock()
        self._pending: set[str] = set()  # taken from `_dirty` by a load that has not finished
        _views.add(self)

    def mark(self, node_ids) -> None:
        with self._dirty_lock:
            self._dirty.update(node_ids)

    def _take_dirty(self) -> set[str]:
        with self._dirty_lock:
            taken, self._dirty = self._dirty, set()
        return taken

    # ------------------------------------------------------------------ reading
    def candidates(self, model: str, *, allow_unverified: bool = False) -> list[Candidate]:
        """Routable offers of `model` (unverifiable ones only with `allow_unverified` where the
        operator allows them), like `routability.candidates`."""
        snap = self._current()
        ok = allow_unverified and self.settings.allow_unverified_nodes
        rows = snap.listed.get((model, ok))
        if rows is None:  # once per snapshot
            rows = snap.listed[(model, ok)] = [c for c in snap.by_model.get(model, ()) if ok or c.offer.verifiable]
        back = snap.backing_off.get(model)
        if not back:
            return rows
        now = utcnow()
        return rows + [c for until, c in back if until <= now and (ok or c.offer.verifiable)]

    def known(self, model: str) -> bool:
        """Whether any node has ever offered `model`."""
        return model in self._current().known

    def models(self) -> list[str]:
        """Every model any node has ever offered."""
        return sorted(self._current().known)

    def size(self) -> int:
        snap = self._snap
        return 0 if snap is None else sum(len(v) for v in snap.by_model.values())

    # ------------------------------------------------------------------ loading
    def _current(self) -> _Snapshot:
        snap = self._snap
        if snap is None or self.ttl_s <= 0:
            with self._lock:
                if self._snap is None or self.ttl_s <= 0:
                    self._snap = self._load()
                snap = self._snap
        elif self._dirty:
            # Patch the changed nodes in, unless a whole reload holds the lock: then serve the
            # view as it is (a node it still offers is re-checked by `placement.claim`; one it
            # lacks comes with that reload or the next patch). Waiting for that reload cost a
            # request up to 3.5 s at 10,000 nodes (bench/fleet.py routing_ms_p99).
            if self._lock.acquire(blocking=False):
                try:
                    if self._dirty:
                        self._snap = self._patch(self._snap)
                    snap = self._snap
                finally:
                    self._lock.release()
        elif time.monotonic() - snap.loaded_at > self._interval_s and not self._refreshing:
            self._refreshing = True  # old: reload in the background, serve this one meanwhile
            threading.Thread(target=self._refresh, name="market-view", daemon=True).start()
        return snap

    def _refresh(self) -> None:
        try:
            with self._lock:
                self._snap = self._load()
        except Exception:  # noqa: BLE001 - the next reader tries again; the old view stays
            log.exception("reloading the market view failed")
        finally:
            self._refreshing = False

    def _load(self) -> _Snapshot:
        """Everything (the caller holds the lock)."""
        self._pending |= self._take_dirty()  # a change committed from here on is patched in later
        started = time.monotonic()
        snap = _Snapshot(0.0)
        with read_scope(self.engine) as s:
            self._fill(snap, s, None)
            snap.known = set(s.exec(select(NodeOffer.model).distinct()).all())
        self._pending = set()
        took = time.monotonic() - started
        self._interval_s = max(self.ttl_s, took / RELOAD_COST_SHARE)
        snap.loaded_at = time.monotonic()
        (log.info if took > SLOW_RELOAD_S else log.debug)(
            "market view: %d offers reloaded in %.2fs; next reload in %.0fs",
            sum(len(v) for v in snap.by_model.values()), took, self._interval_s)
        return snap

    def _patch(self, old: _Snapshot) -> _Snapshot:
        """`old` with the nodes changed since reloaded (the caller holds the lock); a new
        object: readers of `old` are not disturbed."""
        ids = self._pending | self._take_dirty()
        self._pending = ids
        fresh = _Snapshot(old.loaded_at, known=set(old.known))
        with read_scope(self.engine) as s:
            self._fill(fresh, s, sorted(ids))
        self._pending = set()
        snap = _Snapshot(old.loaded_at, known=old.known | {m for m in fresh.by_model} | {m for m in fresh.backing_off})
        for model in set(old.by_model) | set(fresh.by_model):
            snap.by_model[model] = [c for c in old.by_model.get(model, ()) if c.node.id not in ids] + \
                fresh.by_model.get(model, [])
        for model in set(old.backing_off) | set(fresh.backing_off):
            snap.backing_off[model] = [e for e in old.backing_off.get(model, ()) if e[1].node.id not in ids] + \
                fresh.backing_off.get(model, [])
        return snap

    def _fill(self, snap: _Snapshot, s: Session, node_ids: list[str] | None) -> None:
        now = utcnow()
        for c in candidates(s, self.settings, allow_unverified=True, node_ids=node_ids):
            snap.by_model.setdefault(c.offer.model, []).append(c)
        for until, c in self._backing_off(s, now, node_ids):
            snap.backing_off.setdefault(c.offer.model, []).append((until, c))

    def _backing_off(self, s: Session, now: datetime, node_ids: list[str] | None) -> list[tuple[datetime, Candidate]]:
        """Offers of nodes that are routable but for a backoff that ends later (judged as of
        its end: a node whose heartbeats go stale by then drops out at the next reload)."""
        q = select(NodeOffer, Node).join(Node, Node.id == NodeOffer.node_id).where(Node.backoff_until > now)
        if node_ids is not None:
            q = q.where(col(Node.id).in_(node_ids))
        rows = s.exec(q).all()
        stakes = bonded_by_ref(s, sorted({f"node:{n.id}" for _, n in rows})) if self.settings.min_stake else {}
        return [(n.backoff_until, Candidate(o, n)) for o, n in rows
                if why_not_routable(n, o, self.settings, stakes.get(f"node:{n.id}"), n.backoff_until) is None]
