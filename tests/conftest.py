"""Shared fixtures: real PostgreSQL and Redis servers, each test session in its own space.

PostgreSQL: a fresh database `agora_t_<random>` per fixture use, dropped afterwards, so
parallel sessions (and CI) never see each other's rows. Redis: a random key prefix.
Tests that need a server are skipped with a clear reason when it is not reachable,
except under CI=true where a missing server is a failure.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid

import pytest

PG_ADMIN_URL = os.environ.get("AGORA_TEST_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AGORA_TEST_REDIS", "redis://127.0.0.1:6379/0")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _need(host: str, port: int, what: str) -> None:
    if _reachable(host, port):
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} at {host}:{port} is not reachable (CI must start it)")
    pytest.skip(f"{what} at {host}:{port} is not reachable")


@contextlib.contextmanager
def fresh_pg_database():
    """Create `agora_t_<random>`, yield its URL, drop it (forcibly) afterwards."""
    _need("127.0.0.1", 5432, "PostgreSQL")
    import sqlalchemy as sa

    name = f"agora_t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url():
    """URL of a brand-new, empty PostgreSQL database; dropped after the test."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(scope="module")
def pg_url_module():
    """Like pg_url, shared by one test module."""
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def redis_url():
    _need("127.0.0.1", 6379, "Redis")
    return REDIS_URL


@pytest.fixture
def redis_prefix():
    return f"agora-test-{uuid.uuid4().hex[:8]}:"


class OwnRedis:
    """A redis-server of the test's own on a free port, which the test may kill and restart
    (the shared one on 6379 must stay up for everyone else)."""

    def __init__(self, tmp_path):
        import shutil

        self.exe = shutil.which("redis-server")
        if self.exe is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed")
            pytest.skip("redis-server is not installed")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.dir = tmp_path
        self.proc = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import subprocess
        import time

        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not _reachable("127.0.0.1", self.port):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: connections drop at once, nothing is flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        self.kill()


@pytest.fixture
def own_redis(tmp_path):
    r = OwnRedis(tmp_path)
    yield r
    r.stop()
