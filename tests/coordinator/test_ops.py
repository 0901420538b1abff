"""Probes for balancers and orchestrators: /healthz (the process answers) and /readyz (the
database answers and the relay bus is connected; 503 with Retry-After when not)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from coordinator.app import create_app
from coordinator.db import create_all, make_engine
from coordinator.runtime import Runtime
from coordinator.settings import CoordinatorSettings


def test_readiness_follows_the_relay_bus(tmp_path, own_redis):
    settings = CoordinatorSettings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 't.db'}",
                                   run_worker_in_process=False, redis_url=own_redis.url, redis_prefix="t:")
    engine = make_engine(settings.effective_database_url)
    create_all(engine)
    rt = Runtime(settings, engine=engine)
    try:
        with TestClient(create_app(runtime=rt)) as c:
            assert c.get("/healthz").status_code == 200
            ready = c.get("/readyz")
            assert ready.status_code == 200 and ready.json()["replica"] == rt.replica_id
            own_redis.kill()
            r = c.get("/readyz")
            assert r.status_code == 503 and r.headers["retry-after"] and c.get("/healthz").status_code == 200
            own_redis.start()
            assert c.get("/readyz").status_code == 200  # reconnects by itself
    finally:
        rt.stop()


def test_gc_thresholds_come_from_the_environment_when_an_operator_sets_them(monkeypatch, caplog):
    from coordinator.app import GC_THRESHOLDS, gc_thresholds

    monkeypatch.delenv("AGORA_GC_THRESHOLDS", raising=False)
    assert gc_thresholds() == GC_THRESHOLDS
    monkeypatch.setenv("AGORA_GC_THRESHOLDS", "5000,3,50")
    assert gc_thresholds() == (5000, 3, 50)
    for bad in ("5000,3", "a,b,c", "0,2,10"):
        monkeypatch.setenv("AGORA_GC_THRESHOLDS", bad)
        assert gc_thresholds() == GC_THRESHOLDS
    assert "not three positive integers" in caplog.text
