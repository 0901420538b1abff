"""The Alembic migrations build exactly the schema the models describe, on SQLite and
PostgreSQL (so production never runs `create_all`)."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine
from sqlmodel import SQLModel

import coordinator.models  # noqa: F401
from coordinator.migrate import upgrade


def _diff(url: str) -> list:
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    engine.dispose()
    return diff


def test_migrations_match_models_on_sqlite(tmp_path):
    assert _diff(f"sqlite:///{tmp_path / 'm.db'}") == []


@pytest.mark.postgres
def test_migrations_match_models_on_postgres(pg_url):
    assert _diff(pg_url) == []
    upgrade(pg_url)  # idempotent: a second run is a no-op
