"""Ledger fixtures: a fresh SQLite file per test, and PostgreSQL through `pg_url`."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, event
from sqlmodel import Session, SQLModel

import pricing.ledger  # noqa: F401  (registers the ledger tables)


def make_engine(url: str):
    """As production builds it: on SQLite, SQLAlchemy (not pysqlite) issues BEGIN, so
    savepoints nest inside the caller's transaction instead of committing it."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record):
            dbapi_conn.isolation_level = None
            dbapi_conn.execute("PRAGMA journal_mode=WAL")

        @event.listens_for(engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        engine = create_engine(url, pool_size=20, max_overflow=20)
    SQLModel.metadata.create_all(engine, tables=[t for n, t in SQLModel.metadata.tables.items()
                                                 if n.startswith("ledger_")])
    return engine


@pytest.fixture
def engine(tmp_path):
    e = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield e
    e.dispose()


@pytest.fixture
def session(engine):
    with Session(engine) as s:
        yield s


@pytest.fixture
def pg_engine(pg_url):
    e = make_engine(pg_url)
    yield e
    e.dispose()
