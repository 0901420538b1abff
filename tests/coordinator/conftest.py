from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.db import create_all, make_engine
from coordinator.runtime import Runtime
from coordinator.settings import CoordinatorSettings


@pytest.fixture
def settings(tmp_path) -> CoordinatorSettings:
    return CoordinatorSettings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 't.db'}",
                               run_worker_in_process=False, assign_timeout_s=2.0, admin_token="admin-secret")


@pytest.fixture
def runtime(settings):
    engine = make_engine(settings.effective_database_url)
    create_all(engine)
    rt = Runtime(settings, engine=engine)
    yield rt
    rt.stop()


@pytest.fixture
def client(runtime):
    with TestClient(create_app(runtime=runtime)) as c:
        yield c
