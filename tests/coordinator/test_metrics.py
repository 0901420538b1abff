"""Prometheus from every process: after real traffic every named series is in `/metrics`,
and what describes the market (settlements, ledger volume and fees, holds, audits, routable
nodes) equals what the database says. Also: audit verdicts and reasons, per-node series
only behind the setting, bounded labels (SQLite and PostgreSQL), and an `agora worker`
process serving its own metrics port (slow)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func
from sqlmodel import select

from coordinator import metrics
from coordinator.db import create_all, make_engine
from coordinator.models import Audit, AuditStatus, InferenceRequest, RequestStatus
from coordinator.runtime import Runtime
from coordinator.settings import CoordinatorSettings
from pricing.ledger_models import HoldState, LedgerHold, LedgerTransfer
from tests.e2e.market import free_port

NAMED = [  # issue 14, part 3, and the brief's additions
    "agora_requests_total", "agora_ttft_seconds", "agora_inter_token_seconds", "agora_dispatch_batch_size",
    "agora_dispatch_seconds", "agora_settlements_total", "agora_audits_total", "agora_nodes_routable",
    "agora_ledger_volume_nano_usd_total", "agora_requests_queued", "agora_queue_wait_seconds",
    "agora_settle_batch_size", "agora_settle_seconds", "agora_task_failures_total",
    "agora_ledger_fees_nano_usd_total", "agora_holds_open", "agora_holds_open_nano_usd",
]


def scrape(text: str) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label items: value}}"""
    out: dict[str, dict[tuple, float]] = defaultdict(dict)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def one(samples: dict, name: str, **labels) -> float:
    return samples[name][tuple(sorted(labels.items()))]


# ---------------------------------------------------------------- a live market in this process
class LiveMarket:
    """The embedded coordinator (SQLite, in-process Celery worker) on a real port, a seller
    and a trusted verifier (built-in engine) as agents in a thread of their own."""

    def __init__(self, home, **overrides):
        import uvicorn

        from coordinator.app import create_app
        from node_agent.identity import Identity

        self.verifier_id = Identity.generate()
        self.settings = CoordinatorSettings(**{
            "home": home, "database_url": f"sqlite:///{home / 'm.db'}", "run_worker_in_process": True,
            "inline_dispatch": False,  # every request through the Celery micro-batch: dispatch rounds are measured
            "canary_interval_s": 0,  # no purchases of the coordinator's own: the test counts every request
            "admin_token": "admin", "trusted_verifiers": [self.verifier_id.public_key_hex],
            "heartbeat_interval_s": 1.0, **overrides})
        engine = make_engine(self.settings.effective_database_url)
        create_all(engine)
        self.rt = Runtime(self.settings, engine=engine)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(runtime=self.rt), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        threading.Thread(target=self.server.run, daemon=True).start()
        self.loop = asyncio.new_event_loop()
        self.agents_task = None
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def start_agents(self) -> None:
        from node_agent.agent import NodeAgent
        from node_agent.engines.builtin import load_builtin_engine
        from node_agent.identity import Identity
        from node_agent.settings import NodeSettings

        async def run():
            agents = []
            for ident, extra in ((Identity.generate(), {}), (self.verifier_id, {"verify_only": True,
                                                                                 "operator": "platform"})):
                eng = load_builtin_engine("tiny", max_batch=4)
                await eng.start()
                agents.append(NodeAgent(NodeSettings(coordinator=self.base, model="tiny", region="eu-west",
                                                     max_concurrency=4, advertised_tokens_per_s=50.0,
                                                     heartbeat_interval_s=1.0, **extra), eng, ident))
            await asyncio.gather(*(a.run() for a in agents))

        async def start():
            self.agents_task = asyncio.ensure_future(run())

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def wait(self, cond, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except (httpx.HTTPError, KeyError):
                pass
            time.sleep(0.1)
        raise TimeoutError(what)

    def stop(self) -> None:
        if self.agents_task is not None:
            self.loop.call_soon_threadsafe(self.agents_task.cancel)
        time.sleep(0.2)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.server.should_exit = True
        time.sleep(0.3)
        self.rt.stop()
        from celery._state import _set_task_join_will_block

        # A worker started in this process marks it as one (result.get() refused); undo that
        # for the tests after this one, as celery.contrib.testing.worker does.
        _set_task_join_will_block(False)


@pytest.fixture
def live(tmp_path):
    m = LiveMarket(tmp_path)
    try:
        m.wait(lambda: m.server.started, "the coordinator to start", 20)
        m.start_agents()
        m.wait(lambda: any(x["id"] == "tiny" and x["live_nodes"] >= 1
                           for x in httpx.get(m.base + "/v1/models").json()["data"]), "a live seller")
        yield m
    finally:
        m.stop()


def test_every_named_series_appears_after_traffic_and_the_market_matches_the_database(live):
    from coordinator.account_service import create_account

    with live.rt.session() as s:
        _account, key = create_account(s, "buyer", 10**9)
    auth = {"Authorization": f"Bearer {key}"}
    before = scrape(httpx.get(live.base + "/metrics").text)  # this process's counters: other tests count too
    ok = 0
    with httpx.Client(base_url=live.base, headers=auth, timeout=60) as c:
        for i in range(3):
            assert c.post("/v1/completions", json={"model": "tiny", "prompt": f"p{i}", "max_tokens": 6,
                                                   "temperature": 0}).status_code == 200
            ok += 1
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200 and "[DONE]" in r.read().decode()
        ok += 1
        assert c.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404

    def quiet():  # everything settled and every audit judged by the trusted verifier
        with live.rt.session() as s:
            held = s.exec(select(func.count()).select_from(LedgerHold).where(
                LedgerHold.state == HoldState.PENDING)).one()
            busy = s.exec(select(func.count()).select_from(InferenceRequest).where(
                InferenceRequest.status != RequestStatus.COMPLETED)).one()
            judging = s.exec(select(func.count()).select_from(Audit).where(
                Audit.status.in_((AuditStatus.PENDING, AuditStatus.SENT)))).one()  # type: ignore[attr-defined]
            audited = s.exec(select(func.count()).select_from(Audit)).one()
        return held == 0 and busy == 0 and judging == 0 and audited >= 1

    live.wait(quiet, "settlement and audits", 60)
    text = httpx.get(live.base + "/metrics").text
    got = scrape(text)
    names = {fam.name for fam in text_string_to_metric_families(text)} | set(got)
    for name in NAMED:
        assert name in names, name

    with live.rt.session() as s:
        completed = s.exec(select(func.count()).select_from(InferenceRequest).where(
            InferenceRequest.status == RequestStatus.COMPLETED)).one()
        costs = s.exec(select(func.sum(InferenceRequest.cost)).where(
            InferenceRequest.status == RequestStatus.COMPLETED)).one()
        posted = s.exec(select(func.sum(LedgerHold.posted_amount)).where(LedgerHold.state == HoldState.POSTED)).one()
        fees = s.exec(select(func.sum(LedgerTransfer.amount)).where(LedgerTransfer.kind == "fee")).one()
        earned = s.exec(select(func.sum(LedgerTransfer.amount)).where(LedgerTransfer.kind == "earning")).one()
        audits = dict(s.exec(select(Audit.status, func.count()).group_by(Audit.status)).all())
    assert completed == ok
    assert one(got, "agora_settlements_total") == completed
    assert one(got, "agora_ledger_volume_nano_usd_total") == posted == costs == earned + fees > 0
    assert one(got, "agora_ledger_fees_nano_usd_total") == fees > 0
    assert one(got, "agora_holds_open") == 0 and one(got, "agora_holds_open_nano_usd") == 0
    assert one(got, "agora_requests_queued") == 0
    verdicts = defaultdict(float)
    for labels, v in got["agora_audits_total"].items():
        verdicts[dict(labels)["verdict"]] += v
    assert verdicts["passed"] == audits.get(AuditStatus.PASSED, 0) >= 1
    assert verdicts["failed"] == audits.get(AuditStatus.FAILED, 0)
    assert one(got, "agora_nodes_routable", engine="builtin", region="eu-west") == 1  # the verifier sells nothing
    assert one(got, "agora_nodes_online") == 1
    assert one(got, "agora_ask_price_nano_usd", model="tiny", side="out", quantile="0.5") == 200_000_000
    assert one(got, "agora_metrics_db_up") == 1
    # recorded where it happened (this process: the API and its in-process worker), since `before`
    def new(name, **labels):
        return one(got, name, **labels) - before.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    assert new("agora_requests_total", outcome="200") == ok
    assert new("agora_requests_total", outcome="404") == 1
    assert new("agora_ttft_seconds_count") == ok
    assert new("agora_inter_token_seconds_count") > 0
    assert new("agora_queue_wait_seconds_count", path="batch") == ok
    assert new("agora_dispatch_batch_size_count") >= 1
    assert new("agora_dispatch_batch_size_sum") >= ok
    assert new("agora_dispatch_seconds_count") == new("agora_dispatch_batch_size_count")
    assert new("agora_dispatch_requests_total", result="assigned") >= ok
    assert new("agora_settle_batch_size_count") >= 1
    assert new("agora_settle_batch_size_sum") >= completed
    assert new("agora_task_failures_total", task="agora.settle") == 0
    for name, series in got.items():  # bounded labels: never an id
        for labels in series:
            for k, _ in labels:
                assert k not in ("node", "request", "request_id", "account", "account_id"), (name, k)


# ---------------------------------------------------------------- the collector on both databases
@pytest.fixture(params=["sqlite", "postgres"])
def market_rt(request, tmp_path):
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'c.db'}"

    def make(**kw):
        settings = CoordinatorSettings(home=tmp_path, database_url=url, run_worker_in_process=False, **kw)
        engine = make_engine(url)
        create_all(engine)
        rt = Runtime(settings, engine=engine)
        made.append(rt)
        return rt

    made: list[Runtime] = []
    yield make
    for rt in made:
        rt.stop()


def _seller(rt, region: str):
    from tests.coordinator.test_settlement import _node

    ident = _node(rt)
    with rt.session() as s:
        from coordinator.models import Node

        node = s.get(Node, ident.public_key_hex)
        node.region = region
    return ident


def test_audits_by_verdict_and_reason_per_node_series_and_bounded_labels(market_rt):
    from tests.coordinator.test_settlement import _request

    rt = market_rt(metrics_per_node=True, metrics_max_label_values=1)
    a, _b, _c = _seller(rt, "eu-west"), _seller(rt, "eu-west"), _seller(rt, "ap-south")
    rid, _ = _request(rt, a)
    rows = [(AuditStatus.PASSED, {"passed": True, "reasons": []}),
            (AuditStatus.PASSED, {"passed": True, "reasons": []}),
            (AuditStatus.FAILED, {"passed": False, "reasons": ["logprob_mismatch", "not_greedy"]}),
            (AuditStatus.FAILED, {"passed": False, "reasons": ["prompt_overbilled"]}),
            (AuditStatus.FAILED, {"passed": False, "reasons": ["<script>" * 20]}),  # never a label as it is
            (AuditStatus.EXPIRED, None), (AuditStatus.PENDING, None), (AuditStatus.SENT, None)]
    with rt.session() as s:
        for segment, (status, verdict) in enumerate(rows):
            s.add(Audit(request_id=rid, segment=segment, node_id=a.public_key_hex, status=status, verdict=verdict))
    got = scrape(metrics.render(rt).decode())
    assert got["agora_audits_total"] == {
        (("reason", "none"), ("verdict", "passed")): 2,
        (("reason", "logprob_mismatch"), ("verdict", "failed")): 1,
        (("reason", "prompt_overbilled"), ("verdict", "failed")): 1,
        (("reason", "other"), ("verdict", "failed")): 1,
        (("reason", "no_verifier"), ("verdict", "expired")): 1,
    }
    assert one(got, "agora_audits_open", status="pending") == 1 and one(got, "agora_audits_open", status="sent") == 1
    # one region named (the most common), the other summed under `other`
    assert got["agora_nodes_routable"] == {(("engine", "builtin"), ("region", "eu-west")): 2,
                                          (("engine", "builtin"), ("region", "other")): 1}
    assert one(got, "agora_requests_in_flight", status="assigned") == 1
    assert one(got, "agora_slots", state="capacity") == 12 and one(got, "agora_slots", state="busy") == 1
    assert one(got, "agora_holds_open") == 1
    with rt.session() as s:
        held = s.exec(select(LedgerHold.amount).where(LedgerHold.state == HoldState.PENDING)).one()
    assert one(got, "agora_holds_open_nano_usd") == held
    assert one(got, "agora_node_routable", node=a.public_key_hex) == 1
    assert one(got, "agora_node_active_requests", node=a.public_key_hex) == 1

    plain = market_rt()  # the default: no per-node series
    names = set(scrape(metrics.render(plain).decode()))
    assert not {n for n in names if n.startswith("agora_node_")}
    assert "agora_nodes_routable" in names


def test_a_database_outage_leaves_the_process_metrics_up(runtime):
    runtime.engine.dispose()
    runtime.read_engine = make_engine("sqlite:////nonexistent/dir/x.db")
    got = scrape(metrics.render(runtime).decode())
    assert one(got, "agora_metrics_db_up") == 0
    assert "agora_ttft_seconds_count" in got and "agora_settlements_total" not in got


def test_a_worker_serves_its_metrics_port_once(runtime):
    port = free_port()
    server = metrics.serve_worker_metrics(runtime, port, "127.0.0.1")
    try:
        assert metrics.serve_worker_metrics(runtime, port, "127.0.0.1") is server  # once per process
        got = scrape(httpx.get(f"http://127.0.0.1:{port}/metrics").text)
        assert "agora_dispatch_batch_size_count" in got and one(got, "agora_metrics_db_up") == 1
        assert metrics.serve_worker_metrics(runtime, 0) is None  # 0: off
    finally:
        server.shutdown()
        metrics._served.pop(port, None)


# ---------------------------------------------------------------- a real `agora worker` process
@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
def test_agora_worker_serves_what_it_records_and_the_same_market(tmp_path, pg_url):
    from tests.conftest import _need
    from tests.e2e.market import Market
    from tests.e2e.test_production_path import production_env

    _need("127.0.0.1", 6379, "Redis")
    port = free_port()
    env = {**production_env(tmp_path, pg_url, "redis://127.0.0.1:6379/0"), "AGORA_WORKER_METRICS_PORT": str(port),
           "AGORA_INLINE_DISPATCH": "false",  # the worker dispatches every request
           "AGORA_CANARY_INTERVAL_S": "0"}  # and there are no purchases but the test's
    m = Market(home=tmp_path, env=env)
    try:
        m.agora("migrate")
        m.start_coordinator()
        m.start_worker()
        m.start_node("node-w", region="eu-west")
        m.wait_live("tiny", 1)
        key = m.agora("account", "create", "--credit", str(10**9))
        for i in range(3):
            r = httpx.post(m.base + "/v1/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                           json={"model": "tiny", "prompt": f"w{i}", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text

        def settled():
            got = scrape(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
            return one(got, "agora_settlements_total") >= 3 and one(got, "agora_holds_open") == 0

        m.wait(settled, "three settlements on the worker's port", 60)
        worker = scrape(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text)
        api = scrape(httpx.get(m.base + "/metrics", timeout=5).text)
        assert one(worker, "agora_dispatch_batch_size_sum") >= 3  # recorded where it ran: the worker
        assert one(worker, "agora_settle_batch_size_sum") >= 3
        assert one(api, "agora_dispatch_batch_size_count") == 0  # not in the API process
        assert one(api, "agora_requests_total", outcome="200") == 3  # the buyer's side: the API
        for name in ("agora_settlements_total", "agora_ledger_volume_nano_usd_total", "agora_ledger_fees_nano_usd_total"):
            assert one(worker, name) == one(api, name) > 0, name  # the market: the same truth from both
        assert one(worker, "agora_nodes_routable", engine="builtin", region="eu-west") == 1
    finally:
        m.stop()
