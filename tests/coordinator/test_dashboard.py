"""The dashboards: per-minute history written once per minute, the sign-in rules (operator,
buyer, seller; cookies, single-use links, no tokens in URLs) and what each page shows."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlmodel import select

from coordinator import history
from coordinator.account_service import create_account
from coordinator.dispatch_store import SqlDispatchStore
from coordinator.models import InferenceRequest, MarketMinute, Node, NodeMinute, RequestStatus
from coordinator.models.account import utcnow
from coordinator.web_auth import COOKIE, Principal, issue_link
from node_agent.identity import Identity
from protocol import AccountQuery, fresh_stamp
from tests.coordinator.test_node_identity import post
from tests.coordinator.test_routability import _seller


def _finished(s, account_id: str, node_id: str, *, at, ttft_ms: float, tokens: int, cost: int,
              status=RequestStatus.COMPLETED, rid: str | None = None) -> None:
    created = at - timedelta(milliseconds=ttft_ms + 10 * max(0, tokens - 1))  # 10 ms between tokens
    s.add(InferenceRequest(
        id=rid or f"req-{utcnow().timestamp()}-{ttft_ms}-{tokens}", account_id=account_id, model="tiny", kind="chat",
        status=status, prompt_tokens_est=5, max_tokens=tokens, prompt_tokens=5, completion_tokens=tokens,
        cost=cost, node_id=node_id, created_at=created, first_token_at=created + timedelta(milliseconds=ttft_ms),
        finished_at=at, assigned_at=created))


def _market(client, runtime, n_nodes: int = 2):
    sellers = [_seller(client, runtime, price_out=(i + 1) * 100_000_000) for i in range(n_nodes)]
    with runtime.session() as s:
        buyer, key = create_account(s, "buyer", 10**12)
        other, other_key = create_account(s, "other", 10**12)
        buyer_id, other_id = buyer.id, other.id
    return sellers, (buyer_id, key), (other_id, other_key)


def _sign_in(client, credential: str):
    return client.post("/login", data={"credential": credential}, follow_redirects=False)


# ---------------------------------------------------------------- history

def test_each_minute_is_written_once_with_the_requests_that_ended_in_it(client, runtime):
    sellers, (buyer, _), _ = _market(client, runtime)
    now = history.minute_of(utcnow()) + timedelta(seconds=30)
    last_minute = history.minute_of(now) - timedelta(minutes=1)
    with runtime.session() as s:
        for i, ttft in enumerate((10.0, 20.0, 30.0, 400.0)):
            _finished(s, buyer, sellers[i % 2].public_key_hex, at=last_minute + timedelta(seconds=5 + i),
                      ttft_ms=ttft, tokens=11, cost=1000, rid=f"r{i}")
        _finished(s, buyer, sellers[0].public_key_hex, at=last_minute + timedelta(seconds=30), ttft_ms=5,
                  tokens=0, cost=0, status=RequestStatus.FAILED, rid="rf")
        _finished(s, buyer, sellers[0].public_key_hex, at=now + timedelta(minutes=5), ttft_ms=5, tokens=3,
                  cost=7, rid="later")  # not in the minute
    with runtime.session() as s:
        assert history.record(s, runtime.settings, now) == 1
    with runtime.session() as s:
        assert history.record(s, runtime.settings, now) == 0  # written once
        [m] = s.exec(select(MarketMinute)).all()
        assert (m.model, m.requests, m.completed, m.failed, m.completion_tokens, m.volume) == ("tiny", 5, 4, 1, 44, 4000)
        assert m.nodes_live == 2 and m.capacity == 8
        assert m.ttft_p50_ms == pytest.approx(25.0, abs=0.5) and m.ttft_p99_ms > 300
        assert m.itl_p50_ms == pytest.approx(10.0, abs=0.5)
        assert (m.ask_out_p10, m.ask_out_p90) == (110_000_000, 190_000_000)
        rows = {r.node_id: r for r in s.exec(select(NodeMinute)).all()}
        assert rows[sellers[0].public_key_hex].requests == 3 and rows[sellers[0].public_key_hex].failed == 1
        assert rows[sellers[1].public_key_hex].revenue == 2000 and rows[sellers[1].public_key_hex].routable


def test_a_restart_catches_up_at_most_ten_minutes_and_old_rows_are_pruned(client, runtime):
    _market(client, runtime, 1)
    now = history.minute_of(utcnow()) + timedelta(seconds=30)
    with runtime.session() as s:
        s.add(MarketMinute(minute=history.minute_of(now) - timedelta(days=40), model="tiny"))
        s.add(MarketMinute(minute=history.minute_of(now) - timedelta(hours=3), model="tiny"))
    with runtime.session() as s:
        assert history.record(s, runtime.settings, now) == history.MAX_CATCH_UP
        assert history.prune(s, runtime.settings, now) == 1
    with runtime.session() as s:
        assert len(s.exec(select(MarketMinute)).all()) == 1 + history.MAX_CATCH_UP


def test_the_sweep_writes_the_history(client, runtime):
    _market(client, runtime, 1)
    out = SqlDispatchStore(runtime).sweep()
    assert out["history_minutes"] == 1
    with runtime.session() as s:
        assert s.exec(select(NodeMinute)).first() is not None


# ---------------------------------------------------------------- signing in

def test_a_browser_without_a_session_is_sent_to_the_login_page(client):
    r = client.get("/dashboard", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/dashboard.json").status_code == 401
    assert client.get("/dashboard?token=admin-secret", follow_redirects=False).status_code == 303  # no tokens in URLs
    assert 'name="credential"' in client.get("/login").text


def test_the_operator_signs_in_with_its_token_and_gets_an_http_only_cookie(client, runtime):
    sellers, _, _ = _market(client, runtime)
    assert _sign_in(client, "wrong").status_code == 401
    r = _sign_in(client, "admin-secret")
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "admin-secret" not in cookie
    page = client.get("/dashboard")
    assert page.status_code == 200
    for chart in ("price-perf", "price-index", "throughput", "latency", "utilisation", "revenue", "audits",
                  "outcomes"):
        assert f'id="{chart}"' in page.text
    assert page.text.count('class="point"') == 2  # one point per live node
    nodes = client.get("/dashboard/nodes").text
    assert all(f'data-node-id="{s.public_key_hex}"' in nodes for s in sellers)
    assert client.get(f"/dashboard/nodes/{sellers[0].public_key_hex}").status_code == 200
    frag = client.get("/dashboard/nodes?fragment=1").text
    assert frag.startswith("<p") and "<html" not in frag
    client.post("/logout")
    assert client.get("/dashboard", follow_redirects=False).status_code == 303


def test_a_buyer_sees_its_own_usage_and_nothing_else(client, runtime):
    sellers, (buyer, key), (other, _) = _market(client, runtime)
    with runtime.session() as s:
        _finished(s, buyer, sellers[0].public_key_hex, at=utcnow(), ttft_ms=12, tokens=9, cost=4321, rid="mine")
        _finished(s, other, sellers[1].public_key_hex, at=utcnow(), ttft_ms=12, tokens=9, cost=99, rid="theirs")
    r = _sign_in(client, key)
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/usage"
    u = client.get("/dashboard/usage.json").json()
    assert u["account_id"] == buyer and [x["id"] for x in u["recent"]] == ["mine"]
    assert u["models"][0]["spend_nano_usd"] == 4321
    page = client.get("/dashboard/usage").text
    assert 'id="usage-by-model"' in page and "theirs" not in page and 'id="spend-by-day"' in page
    assert client.get(f"/dashboard/usage?account={other}").status_code == 403
    assert client.get(f"/dashboard/usage.json?account={other}").status_code == 403
    assert client.get("/dashboard").status_code == 403
    assert client.get("/dashboard/nodes").status_code == 403
    assert client.get("/dashboard.json").status_code == 403


def test_a_sign_in_link_works_once_and_expires(client, runtime):
    with runtime.session() as s:
        link = issue_link(s, Principal("operator"), runtime.settings)
        old = issue_link(s, Principal("operator"), runtime.settings.model_copy(update={"login_link_s": 0.001}))
    r = client.get(f"/login/link/{link}", follow_redirects=False)
    assert r.status_code == 303 and COOKIE in r.headers["set-cookie"]
    client.cookies.clear()
    assert client.get(f"/login/link/{link}", follow_redirects=False).status_code == 401  # spent
    assert client.get(f"/login/link/{old}", follow_redirects=False).status_code == 401  # expired
    assert client.get("/login/link/forged", follow_redirects=False).status_code == 401


def test_a_seller_signs_in_by_its_node_key_and_sees_only_its_node(client, runtime):
    sellers, _, _ = _market(client, runtime)
    me, rival = sellers
    q = AccountQuery(node_id=me.public_key_hex, **fresh_stamp()).sign(me)
    r = post(client, "/v1/nodes/me/dashboard-link", q)
    assert r.status_code == 200, r.text
    assert post(client, "/v1/nodes/me/dashboard-link", q).status_code == 401  # the same signed bytes again
    forged = AccountQuery(node_id=me.public_key_hex, **fresh_stamp()).sign(Identity.generate())
    assert post(client, "/v1/nodes/me/dashboard-link", forged).status_code == 401
    url = r.json()["url"]
    got = client.get(url[url.index("/login/link/"):], follow_redirects=False)
    assert got.headers["location"] == "/dashboard/coach"
    coach = client.get("/dashboard/coach.json").json()
    assert coach["node_id"] == me.public_key_hex and coach["models"][0]["rank"] == 1  # the cheaper of two
    assert 'id="kpi-suggested-price"' in client.get("/dashboard/coach").text
    assert client.get(f"/dashboard/nodes/{me.public_key_hex}").status_code == 200
    assert client.get(f"/dashboard/nodes/{rival.public_key_hex}").status_code == 403
    assert client.get("/dashboard").status_code == 403
    assert client.get("/dashboard/usage").status_code == 403


def test_a_banned_node_is_shown_with_its_reason(client, runtime):
    sellers, _, _ = _market(client, runtime)
    with runtime.session() as s:
        s.get(Node, sellers[1].public_key_hex).banned = True
    _sign_in(client, "admin-secret")
    data = client.get("/dashboard.json").json()
    banned = next(n for n in data["nodes"] if n["id"] == sellers[1].public_key_hex)
    assert banned["not_routable_because"] == "banned" and not banned["routable"]
    row = client.get("/dashboard/nodes").text.split(f'data-node-id="{sellers[1].public_key_hex}"')[1].split("</tr>")[0]
    assert 'class="banned"' in row and ">banned<" in row


def test_agora_node_coach_reads_the_signed_report(client, runtime):
    from node_agent.cli import format_coach

    sellers, (buyer, _), _ = _market(client, runtime)
    me = sellers[1]  # the dearer of two
    with runtime.session() as s:
        for i in range(6):
            _finished(s, buyer, sellers[0].public_key_hex, at=utcnow() - timedelta(minutes=2), ttft_ms=20,
                      tokens=50, cost=10_000, rid=f"c{i}")
    r = post(client, "/v1/nodes/me/coach", AccountQuery(node_id=me.public_key_hex, **fresh_stamp()).sign(me))
    assert r.status_code == 200, r.text
    report = r.json()
    [m] = report["models"]
    assert m["rank"] == 2 and m["demand_tokens_per_min"] == 300 / 60  # 6 × 50 tokens in the hour
    assert m["suggestion"]["price_out_usd_per_mtok"] <= m["price_out_usd_per_mtok"]
    text = format_coach(report)
    assert "rank #2 of 2" in text and "suggested price" in text and m["suggestion"]["reason"] in text
    other = post(client, "/v1/nodes/me/coach",
                 AccountQuery(node_id=me.public_key_hex, **fresh_stamp()).sign(sellers[0]))
    assert other.status_code == 401  # another node's key cannot read this node's report


@pytest.mark.postgres
def test_the_dashboards_on_postgresql(tmp_path, pg_url):
    from fastapi.testclient import TestClient

    from coordinator.app import create_app
    from coordinator.db import create_all, make_engine
    from coordinator.runtime import Runtime
    from coordinator.settings import CoordinatorSettings

    engine = make_engine(pg_url)
    create_all(engine)
    rt = Runtime(CoordinatorSettings(home=tmp_path, database_url=pg_url, run_worker_in_process=False,
                                     admin_token="admin-secret"), engine=engine)
    try:
        with TestClient(create_app(runtime=rt)) as client:
            sellers, (buyer, key), _ = _market(client, rt)
            now = history.minute_of(utcnow()) + timedelta(seconds=30)
            with rt.session() as s:
                for i in range(3):
                    _finished(s, buyer, sellers[0].public_key_hex, at=now - timedelta(seconds=40 + i), ttft_ms=20,
                              tokens=8, cost=500, rid=f"pg{i}")
            with rt.session() as s:
                assert history.record(s, rt.settings, now) == 1
            with rt.session() as s:
                [m] = s.exec(select(MarketMinute)).all()
                assert (m.completed, m.volume, m.nodes_live) == (3, 1500, 2)
            r = post(client, "/v1/nodes/me/coach",
                     AccountQuery(node_id=sellers[1].public_key_hex, **fresh_stamp()).sign(sellers[1]))
            assert r.status_code == 200 and r.json()["models"][0]["rank"] == 2
            assert _sign_in(client, "admin-secret").status_code == 303
            for page in ("/dashboard", "/dashboard/nodes", f"/dashboard/nodes/{sellers[0].public_key_hex}",
                         f"/dashboard/coach?node={sellers[0].public_key_hex}", f"/dashboard/usage?account={buyer}"):
                assert client.get(page).status_code == 200, page
            assert 'class="series"' in client.get("/dashboard?window=1h").text  # the minute is drawn
            client.post("/logout")
            assert _sign_in(client, key).status_code == 303
            assert client.get("/dashboard/usage.json").json()["models"][0]["spend_nano_usd"] == 1500
    finally:
        rt.stop()


def test_outcomes_are_counted_by_class(client, runtime):
    sellers, (buyer, _), _ = _market(client, runtime, 1)
    now = history.minute_of(utcnow()) + timedelta(seconds=30)
    at = now - timedelta(seconds=50)
    node = sellers[0].public_key_hex
    with runtime.session() as s:
        _finished(s, buyer, node, at=at, ttft_ms=5, tokens=4, cost=10, rid="ok")
        _finished(s, buyer, node, at=at, ttft_ms=5, tokens=2, cost=5, rid="gone")
        _finished(s, buyer, node, at=at, ttft_ms=5, tokens=3, cost=0, rid="broken")
        _finished(s, buyer, node, at=at, ttft_ms=5, tokens=0, cost=0, rid="cancel", status=RequestStatus.CANCELLED)
        _finished(s, buyer, node, at=at, ttft_ms=5, tokens=4, cost=10, rid="moved")
    with runtime.session() as s:
        s.get(InferenceRequest, "gone").delivery = "buyer_gone"
        s.get(InferenceRequest, "broken").delivery = "relay_broken"
        moved = s.get(InferenceRequest, "moved")
        moved.payload = {"failovers": 1}
    with runtime.session() as s:
        history.record(s, runtime.settings, now)
        m = s.exec(select(MarketMinute).where(MarketMinute.model == "tiny")).one()
    assert (m.requests, m.completed, m.cancelled, m.buyer_gone, m.market_fault, m.failed_over) == (5, 4, 1, 1, 1, 1)


def test_a_long_window_is_merged_into_buckets_that_keep_the_totals(runtime):
    start = history.minute_of(utcnow()) - timedelta(hours=24)
    with runtime.session() as s:
        s.add_all(MarketMinute(minute=start + timedelta(minutes=i), model="tiny", requests=2, completed=1,
                               completion_tokens=10, volume=100, ask_out_p10=5, ask_out_p50=10, ask_out_p90=20 + i,
                               ttft_p50_ms=float(i % 7), ttft_p99_ms=float(i)) for i in range(1440))
    with runtime.session() as s:
        rows = history.market_buckets(s, start, "tiny", until=start + timedelta(minutes=1439), max_points=240)
    assert len(rows) == 240 and {r["minutes"] for r in rows} == {6}
    assert sum(r["requests"] for r in rows) == 2880 and sum(r["volume"] for r in rows) == 144_000
    assert rows[-1]["ask_p90"] == 20 + 1439 and rows[0]["ask_p10"] == 5 and rows[-1]["ttft_p99"] == 1439
    assert rows[0]["ttft_p50"] == pytest.approx(sum(i % 7 for i in range(6)) / 6)
