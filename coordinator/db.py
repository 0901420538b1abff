"""Database engine and sessions. SQLite (embedded default) or PostgreSQL (production)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, create_engine


READ_ONLY = "agora_read_only"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, pool_pre_ping=True
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            dbapi_conn.isolation_level = None  # SQLAlchemy issues BEGIN itself (savepoints work)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):  # pragma: no cover - trivial
            # Take the write lock up front: a deferred transaction that reads, then writes
            # after another writer committed fails at once with "database is locked"
            # instead of waiting its turn. A read-only session (`read_scope`) takes none:
            # in WAL mode it reads a snapshot while writers go on.
            conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


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
    """The same engine (and pool), for `read_scope` sessions."""
    return engine.execution_options(**{READ_ONLY: True})


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
