"""Database engine and sessions. SQLite (embedded default) or PostgreSQL (production)."""

from __future__ import annotations

import sqlite3
import threading
from collections import deque
from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, SQLModel, create_engine


READ_ONLY = "agora_read_only"


class WriterTurns:
    """SQLite's write lock, taken in this process in arrival order. SQLite itself makes a
    waiting writer poll with growing sleeps (up to 100 ms between tries), so under load the
    lock sits idle between writers and an unlucky one waits seconds; here the next writer
    of this process is handed the lock the moment the last one commits. Writers of other
    processes (the CLI) still meet SQLite's own busy wait."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held = False
        self._waiting: deque[threading.Event] = deque()
        self._first: deque[threading.Event] = deque()  # finishing work: served before the others

    def acquire(self, timeout_s: float, first: bool = False) -> bool:
        """Wait for the turn; `first`: ahead of every waiter that is not (see `writes_first`)."""
        with self._mutex:
            if not self._held:
                self._held = True
                return True
            turn = threading.Event()
            queue = self._first if first else self._waiting
            queue.append(turn)
        if turn.wait(timeout_s):
            return True
        with self._mutex:
            if turn.is_set():  # handed over as the wait ended
                return True
            queue.remove(turn)
            return False

    def release(self) -> None:
        with self._mutex:
            if self._first:
                self._first.popleft().set()  # handed over: stays held
            elif self._waiting:
                self._waiting.popleft().set()
            else:
                self._held = False


_FIRST = threading.local()


@contextmanager
def writes_first() -> Iterator[None]:
    """Write transactions this thread begins inside take SQLite's write turn ahead of the
    others (`WriterTurns`): for work that ends requests (a receipt, the buyers' endings).
    Their buyers' last chunks and `[DONE]` wait on it, and each frees a node's slot; under
    load, arrival order put them behind every admission queued meanwhile (384 ms p50 at 32
    streams, `bench/overhead.py`). Bounded: each request ends once. No effect on PostgreSQL."""
    before = getattr(_FIRST, "on", False)
    _FIRST.on = True
    try:
        yield
    finally:
        _FIRST.on = before


SQLITE_LOCK_TIMEOUT_S = 30.0


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_LOCK_TIMEOUT_S})
        turns = WriterTurns()
        holders: set[int] = set()  # connections (raw, by id) whose transaction holds the turn

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            dbapi_conn.isolation_level = None  # SQLAlchemy issues BEGIN itself (savepoints work)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):
            # Take the write lock up front: a deferred transaction that reads, then writes
            # after another writer committed fails at once with "database is locked"
            # instead of waiting its turn. A read-only session (`read_scope`) takes none:
            # in WAL mode it reads a snapshot while writers go on.
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
                return
            if not turns.acquire(SQLITE_LOCK_TIMEOUT_S, first=getattr(_FIRST, "on", False)):
                raise OperationalError("BEGIN IMMEDIATE", None, sqlite3.OperationalError(
                    f"database is locked: no turn to write within {SQLITE_LOCK_TIMEOUT_S:.0f}s"))
            holders.add(_raw_id(conn.connection))
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                _done(conn.connection)
                raise

        def _done(dbapi_conn) -> None:
            key = _raw_id(dbapi_conn)
            if key in holders:
                holders.discard(key)
                turns.release()

        # The turn passes on once SQLite has committed or rolled back (the engine's
        # commit/rollback events fire before that), or when the connection goes back to
        # the pool without either (an invalidated connection).
        dialect, do_commit, do_rollback = engine.dialect, engine.dialect.do_commit, engine.dialect.do_rollback

        def _commit(dbapi_conn):
            try:
                do_commit(dbapi_conn)
            finally:
                _done(dbapi_conn)

        def _rollback(dbapi_conn):
            try:
                do_rollback(dbapi_conn)
            finally:
                _done(dbapi_conn)

        dialect.do_commit, dialect.do_rollback = _commit, _rollback
        event.listen(engine, "checkin", lambda dbapi_conn, _record: _done(dbapi_conn))
        event.listen(engine, "close", lambda dbapi_conn, _record: _done(dbapi_conn))

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def _raw_id(conn) -> int:
    """The id of the DB-API connection behind `conn` (a pool proxy or the raw one)."""
    return id(getattr(conn, "dbapi_connection", None) or conn)


def create_all(engine: Engine) -> None:
    """Tests and the embedded demo only; production runs Alembic migrations."""
    import coordinator.models  # noqa: F401  (registers the tables)

    SQLModel.metadata.create_all(engine)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def read_only(engine: Engine) -> Engine:
    """The same engine (and pool), for `read_scope` sessions. On PostgreSQL they read one
    snapshot (REPEATABLE READ: a read-only transaction never fails for it): figures read
    together agree, e.g. a balance and what is held, even while a settlement commits between
    the two statements."""
    opts = {READ_ONLY: True}
    if engine.dialect.name == "postgresql":
        opts["isolation_level"] = "REPEATABLE READ"
    return engine.execution_options(**opts)


@contextmanager
def read_scope(engine: Engine) -> Iterator[Session]:
    """A session for reads only, on a `read_only(engine)`: on SQLite it takes no write lock
    (its transaction is rolled back at the end; anything written in it is lost)."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
        finally:
            session.expunge_all()  # what was read stays readable (a rollback would expire it)
            session.rollback()


def retry_transient(fn, attempts: int = 5, first_delay_s: float = 0.05):
    """Run `fn()` again on transient database errors (lock timeouts, deadlocks,
    serialisation failures, dropped connections), with exponential backoff."""
    import time

    from sqlalchemy.exc import DBAPIError, OperationalError

    delay = first_delay_s
    for attempt in range(attempts):
        try:
            return fn()
        except (OperationalError, DBAPIError) as exc:
            transient = isinstance(exc, OperationalError) or getattr(exc, "connection_invalidated", False) or (
                getattr(getattr(exc, "orig", None), "sqlstate", "") in ("40001", "40P01"))
            if not transient or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay *= 2
