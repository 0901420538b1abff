"""What one coordinator process holds: settings, database engine, bus, Celery wiring.

Built once per process (API server or Celery worker). The embedded default also starts
an in-process Celery worker thread and a sweep ticker, so no broker server is needed.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Iterator

from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session

from coordinator.auth import KeyCache
from coordinator.bus import Bus, BusUnavailable, make_bus
from coordinator.cache_store import make_store
from coordinator.db import make_engine, read_only, read_scope, session_scope
from coordinator.endings import Endings
from coordinator.job_counts import JobCounts
from coordinator.liveness import Liveness
from coordinator.market_view import MarketView
from coordinator.ratelimit import RateLimiter
from coordinator.affinity import PrefixMap
from coordinator.replicas import new_replica_id
from coordinator.settings import CoordinatorSettings
from pricing.stake import StakePolicy
from scheduler import celery_app as celery_module
from scheduler.dispatch import set_store

log = logging.getLogger(__name__)

DISPATCH_FLAG = "dispatch-pending"
SETTLE_FLAG = "settle-pending"


class Runtime:
    def __init__(self, settings: CoordinatorSettings, engine: Engine | None = None, bus: Bus | None = None):
        self.settings = settings
        self.replica_id = new_replica_id()  # this process, as an API replica (coordinator/replicas.py)
        self.engine = engine or make_engine(settings.effective_database_url)
        self.read_engine = read_only(self.engine)
        self.bus = bus or make_bus(settings.redis_url, settings.redis_prefix)
        self.celery = celery_module.configure(settings.broker_url, queue=settings.celery_queue)
        self._worker = None
        self._worker_thread: threading.Thread | None = None
        self._ticker_stop = threading.Event()
        from coordinator.dispatch_store import SqlDispatchStore

        self.stake_policy = StakePolicy(default_min=settings.min_stake,
                                        unbonding_delay=timedelta(seconds=settings.unbonding_delay_s))

        self.store = SqlDispatchStore(self)
        self.limiter = RateLimiter(settings)
        self.liveness = Liveness()  # beats heard on this process's work channels (liveness.py)
        self.keys = KeyCache(settings.api_key_cache_s)  # valid API keys seen lately (auth.py)
        self.endings = Endings(self)  # what each buyer was written, recorded in batches (endings.py)
        self.job_counts = JobCounts(self)  # nodes' job counters, written in batches (job_counts.py)
        self.market = MarketView(self.read_engine, settings)  # routable offers in memory (market_view.py)
        # prompt prefixes served lately, per node (affinity.py); None: cache-aware routing off
        self.affinity = PrefixMap(settings.routing_affinity_entries, settings.routing_affinity_ttl_s) \
            if settings.routing_affinity else None
        self.response_cache = make_store(settings)  # answers of opted-in deterministic requests (response_cache.py)
        set_store(self.store)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with session_scope(self.engine) as session:
            yield session

    @contextmanager
    def read_session(self) -> Iterator[Session]:
        """For reads only (auth, balances, listings): never waits for SQLite's write lock."""
        with read_scope(self.read_engine) as session:
            yield session

    def trigger_dispatch(self) -> None:
        """Ask for a dispatch round unless one is already pending (micro-batching). Raises
        BusUnavailable when neither the relay nor the broker can take it (the caller then
        refuses the work it cannot place, with a 503)."""
        if self.bus.set_flag(DISPATCH_FLAG, ttl_s=1.0):
            from kombu.exceptions import OperationalError

            from scheduler.tasks import dispatch

            try:
                dispatch.apply_async(
                    kwargs={"window_ms": self.settings.dispatch_window_ms, "policy": self.settings.routing_policy}
                )
            except OperationalError as exc:
                self.bus.clear_flag(DISPATCH_FLAG)
                raise BusUnavailable(f"the broker cannot take the dispatch task: {exc}") from exc

    def kick_dispatch(self) -> None:
        """`trigger_dispatch` where nobody waits on it (capacity freed, a node connected): if
        the relay or broker is down, the sweep dispatches what is queued once they are back."""
        try:
            self.trigger_dispatch()
        except BusUnavailable as exc:
            log.debug("dispatch not triggered: %s", exc)

    def enqueue_settle(self, request_id: str) -> None:
        """Ask for a settle task unless one is already pending: the pending one clears the
        flag before it reads its batch, so it pays this receipt (a batch that was full
        asks again; the sweep resends anything left). Without the relay's flag, always."""
        from scheduler.tasks import settle

        try:
            if not self.bus.set_flag(SETTLE_FLAG, ttl_s=1.0):
                return
        except BusUnavailable:
            pass
        settle.apply_async(args=[request_id])

    def clear_settle_flag(self) -> None:
        try:
            self.bus.clear_flag(SETTLE_FLAG)
        except BusUnavailable:
            pass  # it expires by itself

    def dispatch_audit(self, audit_id: int) -> bool:
        """Send an audit to a verifier node, if one qualifies now (else the sweep retries)."""
        from coordinator.audits import assign_verifier
        from coordinator.models import Audit

        with self.session() as s:
            audit = s.get(Audit, audit_id, with_for_update=True)
            target = assign_verifier(s, audit, self.settings) if audit is not None else None
        if target is None:
            return False
        verifier, frame = target
        self.bus.publish_sync(f"node:{verifier}", frame)
        return True

    def clear_dispatch_flag(self) -> None:
        self.bus.clear_flag(DISPATCH_FLAG)

    # ------------------------------------------------------------ embedded worker
    def start_in_process_worker(self) -> None:
        if self._worker_thread is not None:
            return
        import warnings

        import scheduler.tasks  # noqa: F401  (registers the tasks)

        # Celery warns about root even for an in-process thread that forks nothing.
        warnings.filterwarnings("ignore", message=".*superuser privileges.*")

        self._worker = self.celery.Worker(
            pool="solo", concurrency=1, loglevel="WARNING", quiet=True,
            without_heartbeat=True, without_mingle=True, without_gossip=True,
        )
        self._worker_thread = threading.Thread(target=self._worker.start, name="celery-worker", daemon=True)
        self._worker_thread.start()
        ticker = threading.Thread(target=self._tick, name="agora-beat", daemon=True)
        ticker.start()

    def _tick(self) -> None:
        from scheduler.celery_app import SWEEP_INTERVAL_S
        from scheduler.tasks import sweep

        while not self._ticker_stop.wait(SWEEP_INTERVAL_S):
            try:
                sweep.apply_async()
            except Exception:  # pragma: no cover - logged, next tick retries
                log.exception("could not queue the sweep")

    def stop(self) -> None:
        self._ticker_stop.set()
        if self._worker is not None:
            try:
                self._worker.stop(in_sighandler=False)
            except Exception:  # pragma: no cover
                log.exception("stopping the in-process worker")
        set_store(None)
        self.engine.dispose()
