"""The dashboards in a real browser: Debian's chromium, headless, driven by Playwright's
Python API against a real `agora up` (2 node agents) after traffic from the `openai` client.

Checks the DOM, not only status codes: the price-performance chart has one point per live
node, the node table lists them and sorts by a numeric column (and keeps the order across
live refreshes), a node page draws its history, the live part refreshes without a reload,
the history charts are drawn once the sweep has written a minute, and the sign-in rules
hold (the printed link works once; a buyer signs in with its API key, sees only its own
usage and gets 403 elsewhere; a seller signs in by a link its node key asked for and sees
its coach page). Screenshots of every page go to `artifacts/screenshots/` (or
`$AGORA_SCREENSHOTS`), which CI keeps.

Playwright never downloads a browser here: chromium comes from apt (`scripts/setup.sh`).
Without it, or if it cannot start, every test here SKIPS with the reason printed on
stderr — never a silent pass.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.market import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CHROMIUM = os.environ.get("AGORA_CHROMIUM", "/usr/bin/chromium")
# The machine's network is closed: without these Chromium waits on connections it will never get.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("AGORA_SCREENSHOTS", ROOT / "artifacts" / "screenshots"))
ADMIN_TOKEN = "browser-test-operator-token"
MODEL = "tiny"


def _skip_loudly(reason: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\nBROWSER TESTS SKIPPED: {reason}\n{bar}", file=sys.__stderr__, flush=True)
    pytest.skip(f"BROWSER TESTS SKIPPED: {reason}")


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        _skip_loudly(f"{CHROMIUM} is missing: install Debian's chromium (scripts/setup.sh does, as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _skip_loudly(f"the playwright package is not installed ({exc}); pip install -e '.[dev]'")
    pw = sync_playwright().start()
    try:
        # launch() gives every run a fresh, temporary user data dir.
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000)
    except Exception as exc:  # noqa: BLE001 - any failure to start is a reason to skip, said loudly
        pw.stop()
        _skip_loudly(f"chromium at {CHROMIUM} could not start: {str(exc).splitlines()[0]}")
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield b
    finally:
        b.close()
        pw.stop()


@pytest.fixture(scope="module")
def market(tmp_path_factory, browser):
    """`agora up --nodes 2` with a 1 s dashboard refresh, then a few chat completions."""
    home = tmp_path_factory.mktemp("agora-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
    env.update(AGORA_HOME=str(home), PYTHONUNBUFFERED="1", AGORA_DASHBOARD_REFRESH_S="1",
               AGORA_ADMIN_TOKEN=ADMIN_TOKEN)
    proc = subprocess.Popen([sys.executable, "-m", "agora", "up", "--port", str(port), "--nodes", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines: dict[str, str] = {}
        deadline = time.monotonic() + 180
        while "dashboard" not in lines and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            key, _, value = line.strip().partition(": ")
            lines[key] = value
        assert {"base_url", "api_key", "dashboard"} <= set(lines), (lines, f"logs in {home}/logs")
        base = lines["base_url"].removesuffix("/v1")
        client = openai.OpenAI(base_url=lines["base_url"], api_key=lines["api_key"], max_retries=0)
        ids = []
        for i in range(4):
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"hello {i}"}],
                                               max_tokens=8)
            assert r.usage.completion_tokens == 8
            ids.append(r.id)
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "stream"}],
                                                max_tokens=8, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        ids.append(chunks[0].id)
        http = httpx.Client(base_url=base, timeout=10)
        me = http.get("/v1/account", headers={"Authorization": f"Bearer {lines['api_key']}"}).json()
        other = http.post("/admin/accounts", json={"name": "someone-else", "credit_nano_usd": 10**9},
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
        assert other.status_code == 200, other.text
        yield {"proc": proc, "home": home, "base": base, "api_key": lines["api_key"], "link": lines["dashboard"],
               "openai": client, "http": http, "request_ids": ids, "account_id": me["id"],
               "other_account_id": other.json()["id"], "started": time.monotonic()}
        http.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def operator(browser, market):
    """The operator's browser context, signed in by the printed single-use link."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(20_000)
    page = ctx.new_page()
    resp = page.goto(market["link"])
    yield {"ctx": ctx, "page": page, "first_response": resp}
    ctx.close()


def _shot(page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _live_nodes(market) -> list[dict]:
    """The live sellers of MODEL (not the operator's own verifier, which `agora up` also runs)."""
    return [n for n in market["http"].get("/v1/nodes").json()
            if n["online"] and not n.get("verify_only") and any(o["model"] == MODEL for o in n["offers"])]


def _wait_refresh(page, timeout_ms: int = 10_000) -> None:
    before = page.evaluate("document.body.dataset.updated || ''")
    page.wait_for_function("prev => (document.body.dataset.updated || '') !== prev", arg=before, timeout=timeout_ms)


# ---------------------------------------------------------------- the operator

def test_the_printed_link_signs_the_operator_in_once(browser, market, operator):
    page = operator["page"]
    assert operator["first_response"].status == 200
    assert page.url == market["base"] + "/dashboard", page.url
    assert page.inner_text("h1") == "Market"
    cookies = {c["name"]: c for c in operator["ctx"].cookies()}
    assert cookies["agora_session"]["httpOnly"] and "token" not in page.url
    _shot(page, "market")
    again = browser.new_context()
    try:
        p2 = again.new_page()
        resp = p2.goto(market["link"])
        assert resp.status == 401
        assert p2.url.endswith("/login/link/" + market["link"].rsplit("/", 1)[1])
        assert "used already" in p2.inner_text("#login-error")
        assert p2.locator("form.login input[name=credential]").count() == 1
        assert not [c for c in again.cookies() if c["name"] == "agora_session"]
        _shot(p2, "login-link-spent")
    finally:
        again.close()


def test_the_price_performance_chart_has_one_point_per_live_node(market, operator):
    page = operator["page"]
    live = _live_nodes(market)
    assert len(live) == 2
    points = page.locator("svg#price-perf circle.point")
    assert set(points.evaluate_all("els => els.map(e => e.dataset.key)")) >= {n["id"] for n in live}
    by_key = {p["key"]: p for p in points.evaluate_all(
        "els => els.map(e => ({key: e.dataset.key, y: parseFloat(e.dataset.y)}))")}
    for n in live:
        offer = next(o for o in n["offers"] if o["model"] == MODEL)
        assert by_key[n["id"]]["y"] == pytest.approx(offer["price_out"] / 1e9, rel=1e-4)
    assert page.inner_text("#kpi-nodes b") == "2"
    # the five completions are counted once they have settled (the page refreshes every second)
    page.wait_for_function("() => parseInt(document.querySelector('#kpi-tokens b').textContent.replace(/,/g, '')) >= 40")


def test_only_sellers_are_plotted(market, operator):
    keys = operator["page"].locator("svg#price-perf circle.point").evaluate_all("els => els.map(e => e.dataset.key)")
    assert sorted(keys) == sorted(n["id"] for n in _live_nodes(market))


def test_the_live_part_refreshes_without_a_reload(market, operator):
    page = operator["page"]
    page.evaluate("window.__notReloaded = true")
    _wait_refresh(page)
    _wait_refresh(page)  # at least twice, a second apart
    tokens = int(page.inner_text("#kpi-tokens b").replace(",", ""))
    r = market["openai"].chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "more"}],
                                                 max_tokens=8)
    market["request_ids"].append(r.id)
    page.wait_for_function(
        "n => parseInt(document.querySelector('#kpi-tokens b').textContent.replace(/,/g, '')) >= n",
        arg=tokens + 8)
    assert page.evaluate("window.__notReloaded === true"), "the page reloaded instead of refreshing its live part"


def test_the_node_table_lists_both_nodes_and_sorts_by_a_numeric_column(market, operator):
    page = operator["page"]
    page.goto(market["base"] + "/dashboard/nodes")
    rows = page.locator("table#nodes-table tbody tr[data-node-id]")
    assert set(rows.evaluate_all("els => els.map(e => e.dataset.nodeId)")) >= {n["id"] for n in _live_nodes(market)}
    headers = page.locator("table#nodes-table thead th").all_inner_texts()
    col = headers.index("USD/Mtok out")

    def order() -> list[tuple[str, float]]:
        return page.locator("table#nodes-table tbody tr").evaluate_all(
            f"rs => rs.map(r => [r.dataset.nodeId, parseFloat(r.cells[{col}].dataset.v)])")

    before = order()
    page.locator("table#nodes-table thead th").nth(col).click()
    up = order()
    assert [p for _, p in up] == sorted(p for _, p in up)
    page.locator("table#nodes-table thead th").nth(col).click()
    down = order()
    assert [p for _, p in down] == sorted((p for _, p in down), reverse=True)
    assert len({p for _, p in up}) >= 2 and [p for _, p in down] == [p for _, p in reversed(up)], (before, up, down)
    _wait_refresh(page)  # the refreshed table keeps the chosen order
    assert order() == down
    _shot(page, "nodes")


def test_a_node_page_draws_its_history(market, operator):
    page = operator["page"]
    page.goto(market["base"] + "/dashboard/nodes")  # from the nodes table, whatever ran before
    first = page.locator("table#nodes-table tbody tr").first
    node_id = first.get_attribute("data-node-id")
    first.locator("a").click()
    page.wait_for_url(f"**/dashboard/nodes/{node_id}")
    assert page.inner_text("h1") == "Node"
    assert node_id in page.inner_text("#live p.note")
    assert page.locator("#node-history > .card").count() == 4
    offer = next(o for n in _live_nodes(market) if n["id"] == node_id for o in n["offers"])
    assert page.inner_text("#kpi-price b") == f'{offer["price_out"] / 1e9:.4f}'
    _shot(page, "node")


# ---------------------------------------------------------------- a buyer

def test_a_buyer_signs_in_with_its_api_key_and_sees_only_its_usage(browser, market):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(20_000)
    try:
        page = ctx.new_page()
        page.goto(market["base"] + "/dashboard/usage")
        assert page.url == market["base"] + "/login"  # not signed in: sent to the login page
        _shot(page, "login")
        page.fill("input[name=credential]", "sk-agora-not-a-key")
        page.click("form.login button[type=submit]")
        page.wait_for_selector("#login-error")
        page.fill("input[name=credential]", market["api_key"])
        page.click("form.login button[type=submit]")
        page.wait_for_url("**/dashboard/usage")
        assert page.inner_text("h1") == "Usage"
        assert page.locator("svg#spend-by-day rect.bar").count() >= 1
        spend = sum(float(v) for v in page.locator("svg#spend-by-day rect.bar").evaluate_all(
            "els => els.map(e => e.dataset.v)"))
        assert spend > 0
        shown = set(page.locator("table#usage-recent tbody tr td:first-child").evaluate_all(
            "els => els.map(e => e.dataset.v)"))
        assert set(market["request_ids"]) <= shown, (market["request_ids"], shown)
        assert page.locator("table#usage-by-model tbody tr").first.locator("td").first.inner_text() == MODEL
        assert page.locator("table#usage-nodes tbody tr").count() >= 1
        _shot(page, "usage")
        for path in ("/dashboard", "/dashboard/nodes", f"/dashboard/usage?account={market['other_account_id']}"):
            resp = page.goto(market["base"] + path)
            assert resp.status == 403, path
            assert page.inner_text("h1") == "Not allowed"
        _shot(page, "buyer-forbidden")
        resp = page.goto(market["base"] + f"/dashboard/usage?account={market['account_id']}")
        assert resp.status == 200  # its own account, named, is fine
    finally:
        ctx.close()


# ---------------------------------------------------------------- a seller

def test_a_seller_signs_in_by_its_node_key_and_sees_its_coach_page(browser, market):
    from node_agent.identity import Identity
    from protocol import AccountQuery, fresh_stamp

    key = market["home"] / "nodes" / "node1.pem"
    assert key.exists(), key
    me = Identity.load_or_create(key)
    q = AccountQuery(node_id=me.public_key_hex, **fresh_stamp()).sign(me)
    r = market["http"].post("/v1/nodes/me/dashboard-link", json=q.model_dump(mode="json"))
    assert r.status_code == 200, r.text
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(20_000)
    try:
        page = ctx.new_page()
        page.goto(r.json()["url"])
        assert page.url == market["base"] + "/dashboard/coach"
        assert page.inner_text("h1") == "Coach"
        assert page.locator(f'.coach-model[data-model="{MODEL}"]').count() == 1
        assert float(page.inner_text("#kpi-suggested-price b")) > 0
        assert page.inner_text("#suggestion-reason").strip()
        assert page.inner_text("#kpi-rank b").startswith(("#", "misses"))
        assert page.inner_text("#kpi-win-rate b")
        _shot(page, "coach")
        assert page.goto(market["base"] + "/dashboard").status == 403
        assert page.goto(market["base"] + "/dashboard/usage").status == 403
        others = [n["id"] for n in _live_nodes(market) if n["id"] != me.public_key_hex]
        assert page.goto(market["base"] + f"/dashboard/nodes/{others[0]}").status == 403
        assert page.goto(market["base"] + f"/dashboard/nodes/{me.public_key_hex}").status == 200
    finally:
        ctx.close()


# ---------------------------------------------------------------- history (last: it may wait for a minute)

HISTORY_CHARTS = ("price-index", "paid", "throughput", "latency", "utilisation", "revenue", "audits", "outcomes")


def test_the_history_charts_are_drawn_once_a_minute_is_recorded(market, operator):
    """The sweep (every 2 s under `agora up`) writes each whole minute once it has ended,
    with the market as it stands then and the requests that ended in it; the page picks it
    up on its next refresh. The market's state is drawn from the first minute written; what
    was paid needs the minute of the traffic to end: at most ~62 s after the traffic, less
    the time the tests above took."""
    page = operator["page"]
    page.goto(market["base"] + "/dashboard")
    asks = sorted(next(o for o in n["offers"] if o["model"] == MODEL)["price_out"] for n in _live_nodes(market))
    median = (asks[0] + asks[1]) / 2 / 1e9  # both nodes live: the recorded p50 of two asks
    try:
        page.wait_for_function(
            "m => { const p = document.querySelector('svg#price-index path.series[data-series=median]');"
            " return p && Math.abs(parseFloat(p.dataset.last) - m) < 1e-6; }", arg=median, timeout=75_000)
    except Exception:
        pytest.fail(f"price index never showed the median ask {median}: {page.inner_html('#live')[:3000]}")
    page.wait_for_selector('svg#paid path.series[data-series="paid"]', state="attached", timeout=75_000)
    for cid in HISTORY_CHARTS:
        assert page.locator(f"svg#{cid}").count() == 1, f"#{cid} not drawn: {page.inner_text('#' + cid)}"
        counts = page.locator(f"svg#{cid} path.series").evaluate_all("els => els.map(e => +e.dataset.points)")
        assert counts and max(counts) >= 1, cid
    # the minute of the traffic: what was paid per token bought (prompt and completion) lies
    # between the lowest prompt price and the highest completion price of the nodes used
    paid = float(page.get_attribute('svg#paid path.series[data-series="paid"]', "data-last"))
    ins = [next(o for o in n["offers"] if o["model"] == MODEL)["price_in"] for n in _live_nodes(market)]
    assert min(ins) / 1e9 * 0.999 <= paid <= asks[-1] / 1e9 * 1.001, (paid, ins, asks)
    assert page.locator('svg#latency path.series[data-series="TTFT p50"]').count() == 1
    completed = page.locator('svg#outcomes path.series[data-series="completed"]')
    assert int(completed.get_attribute("data-points")) >= 1
    util = page.locator('svg#utilisation path.series[data-series="utilisation"]')
    assert 0 <= float(util.get_attribute("data-last")) <= 1
    _shot(page, "market-history")
