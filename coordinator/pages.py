"""HTML of the dashboard pages (server-rendered; charts are inline SVG from `charts.py`).

Each page is a shell (`shell`: navigation, styles, a small script that re-fetches the page's
`#live` part every `refresh_s` and keeps the node table's sort) around the live part
rendered by one of the functions below from plain data.
"""

from __future__ import annotations

from html import escape

from coordinator import charts

STYLE = """
body{font:14px system-ui,sans-serif;margin:0;color:#1d2733;background:#f6f7f9}
header{background:#1d2733;color:#fff;padding:10px 24px;display:flex;gap:18px;align-items:center}
header a{color:#cfe3ff;text-decoration:none} header .who{margin-left:auto;color:#aab}
main{padding:16px 24px} h2{font-size:16px;margin:18px 0 6px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(580px,1fr));gap:12px}
.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:10px 12px}
.kpis{display:flex;flex-wrap:wrap;gap:28px;margin:8px 0} .kpi b{display:block;font-size:20px}
table{border-collapse:collapse;background:#fff;font-size:13px} th,td{padding:4px 8px;border-bottom:1px solid #e3e6ea;text-align:right}
th{background:#eef1f4;cursor:pointer;user-select:none;position:sticky;top:0} td.l,th.l{text-align:left}
tr.banned td{color:#b00;text-decoration:line-through} tr.out td.why{color:#a05a00}
svg .axis{stroke:#889} svg text{font-size:11px;fill:#445} .empty{color:#778;font-style:italic}
.note{color:#556} .bad{color:#b00} .good{color:#176b3a} form.login{max-width:420px;margin:60px auto}
input[type=password],input[type=text]{width:100%;padding:8px;margin:6px 0;box-sizing:border-box}
"""

SCRIPT = """
(function(){
  var every=%d*1000, sortState={};
  function sortTable(t, col, dir){
    var body=t.tBodies[0]; if(!body) return;
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=a.cells[col].dataset.v, y=b.cells[col].dataset.v;
      var nx=parseFloat(x), ny=parseFloat(y);
      var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:String(x).localeCompare(String(y));
      return dir*c;});
    rows.forEach(function(r){body.appendChild(r);});
  }
  function wire(){  // each table sorts by its own column, kept across refreshes
    document.querySelectorAll('table.sortable').forEach(function(t){
      t.querySelectorAll('th').forEach(function(th,i){
        th.onclick=function(){var st=sortState[t.id];
          var dir=(st&&st.col===i)?-st.dir:1; sortState[t.id]={col:i,dir:dir}; sortTable(t,i,dir);};});
      var st=sortState[t.id]; if(st){sortTable(t,st.col,st.dir);}
    });
  }
  async function refresh(){
    try{
      var u=new URL(location.href); u.searchParams.set('fragment','1');
      var r=await fetch(u,{credentials:'same-origin'});
      if(r.status===200){document.getElementById('live').innerHTML=await r.text(); wire();
        document.body.dataset.updated=String(Date.now());}
      else if(r.status===401){location.href='/login';}
    }catch(e){}
  }
  wire(); setInterval(refresh, every);
})();
"""

NAV = {"operator": [("/dashboard", "Market"), ("/dashboard/nodes", "Nodes"), ("/dashboard/usage", "Usage")],
       "seller": [("/dashboard/coach", "Coach")], "buyer": [("/dashboard/usage", "Usage")]}


def shell(title: str, live: str, *, role: str | None, who: str = "", refresh_s: float = 5.0) -> str:
    nav = "".join(f'<a href="{href}">{escape(label)}</a>' for href, label in NAV.get(role or "", []))
    out = ('<form method="post" action="/logout" style="display:inline"><button>Sign out</button></form>'
           if role else "")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Agora — {escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width"><style>{STYLE}</style></head>'
            f'<body data-page="{escape(title.lower())}"><header><b>Agora</b>{nav}<span class="who">{escape(who)}</span>'
            f'{out}</header><main><h1>{escape(title)}</h1><div id="live">{live}</div></main>'
            f'<script>{SCRIPT % max(1, int(refresh_s))}</script></body></html>')


def message(title: str, text: str, role: str | None = None) -> str:
    return shell(title, f'<p class="note">{escape(text)}</p>', role=role, refresh_s=3600)


def login(error: str | None = None) -> str:
    err = f'<p class="bad" id="login-error">{escape(error)}</p>' if error else ""
    form = (f'<form class="login card" method="post" action="/login"><h2>Sign in</h2>{err}'
            '<label>Operator token or buyer API key<input type="password" name="credential" autocomplete="off" '
            'required autofocus></label><button type="submit">Sign in</button>'
            '<p class="note">Sellers: run <code>agora node coach --link</code> on the node for a sign-in link.</p></form>')
    return shell("Sign in", form, role=None, refresh_s=3600)


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return escape(str(v))


def _td(v, digits: int = 2, left: bool = False, cls: str = "") -> str:
    sortv = "" if v is None else (str(int(v)) if isinstance(v, bool) else escape(str(v)))
    klass = " ".join(c for c in ("l" if left else "", cls) if c)
    return f'<td{f" class={chr(34)}{klass}{chr(34)}" if klass else ""} data-v="{sortv}">{_fmt(v, digits)}</td>'


def kpis(items: list[tuple[str, str, str]]) -> str:
    return '<div class="kpis">' + "".join(
        f'<span class="kpi" id="kpi-{escape(k)}"><b>{escape(v)}</b>{escape(label)}</span>' for k, v, label in items) + "</div>"


def market(snap: dict, hist: dict, model: str | None, models: list[str], window: str) -> str:
    nodes = [n for n in snap["nodes"] if model is None or n["model"] == model]
    live = [n for n in nodes if n["online"] and not n["verify_only"]]  # sellers: verifiers sell nothing
    pts = [{"x": n["measured_tokens_per_s"], "y": n["price_out_usd_per_mtok"], "group": n["region"],
            "size": n["utilisation"], "key": n["id"],
            "label": f'{n["name"]} ({n["region"]}): {n["price_out_usd_per_mtok"]:.4f} USD/Mtok, '
                     f'{n["measured_tokens_per_s"] or 0:.0f} tok/s, load {n["utilisation"]:.0%}'} for n in live]
    t = hist["times"]

    def chart(cid: str, ylabel: str, series: dict, how: dict | None = None) -> str:
        tt, ss = charts.bucket(t, series, how=how)
        return f'<div class="card">{charts.lines(cid, tt, ss, ylabel=ylabel)}</div>'

    picker = " · ".join(
        (f"<b>{escape(m)}</b>" if m == model else f'<a href="?model={escape(m)}&window={window}">{escape(m)}</a>')
        for m in models)
    windows = " · ".join((f"<b>{w}</b>" if w == window else f'<a href="?model={escape(model or "")}&window={w}">{w}</a>')
                         for w in ("1h", "6h", "24h", "7d", "30d"))
    reqs = snap["requests"]
    head = kpis([
        ("nodes", str(sum(1 for n in nodes if n["routable"])), "routable offers"),
        ("tokens", f'{snap["tokens_window"]:,}', f'tokens, last {snap["window_hours"]:.0f} h'),
        ("volume", f'{snap["volume_window_usd"]:.6f}', "USD volume"),
        ("fees", f'{snap["platform_fees_usd"]:.6f}', "USD platform fees (all time)"),
        ("failed-audits", str(len(snap["failed_audits"])), "failed audits"),
        ("slashes", f'{snap["slashes_window"]} / {snap["slashed_window_usd"]:.6f}', "slashes / USD slashed"),
    ])
    outcomes = ", ".join(f"{escape(k)}: {v}" for k, v in sorted(reqs.items())) or "none yet"
    return (f'<p>Model: {picker or "none yet"} &nbsp; Window: {windows}</p>{head}'
            f'<div class="grid"><div class="card"><h2>Price against measured speed (each live node; '
            f'colour = region, size = load)</h2>'
            f'{charts.scatter("price-perf", pts, xlabel="measured tok/s per stream", ylabel="USD / M output tokens")}</div>'
            + chart("price-index", "ask USD / M output tokens",
                    {"p10": hist["ask_p10"], "median": hist["ask_p50"], "p90": hist["ask_p90"]})
            + chart("paid", "USD paid / M tokens (prompt + completion)", {"paid": hist["paid_per_mtok"]})
            + chart("throughput", "tokens / s", {"tokens/s": hist["tokens_per_s"]})
            + chart("latency", "ms", {"TTFT p50": hist["ttft_p50"], "TTFT p99": hist["ttft_p99"],
                                      "ITL p50": hist["itl_p50"], "ITL p99": hist["itl_p99"]}, {"TTFT p99": "max", "ITL p99": "max"})
            + chart("utilisation", "share of capacity busy", {"utilisation": hist["utilisation"]})
            + chart("revenue", "USD per minute", {"volume": hist["revenue"], "fees": hist["fees"]})
            + chart("audits", "audits per minute", {"passed": hist["audits_passed"], "failed": hist["audits_failed"]})
            + chart("outcomes", "requests per minute", {"completed": hist["completed"], "failed": hist["failed"],
                                                        "rejected": hist["rejected"], "cancelled": hist["cancelled"],
                                                        "failed over": hist["failed_over"],
                                                        "buyer gone": hist["buyer_gone"],
                                                        "market fault": hist["market_fault"]})
            + f'</div><p class="note">Requests, last {snap["window_hours"]:.0f} h: {outcomes}</p>'
            + _failed_audits(snap["failed_audits"]))


def _failed_audits(audits: list[dict]) -> str:
    items = "".join(f"<li>{escape(a['node_id'][:12])} on {escape(a['request_id'])}: "
                    f"{escape(', '.join(a['reasons'] or []))}</li>" for a in audits) or "<li>none</li>"
    return f'<h2>Failed audits</h2><ul id="failed-audits">{items}</ul>'


NODE_COLS = [("name", "node", 0, True), ("model", "model", 0, True), ("region", "region", 0, True),
             ("engine", "engine", 0, True), ("status", "status", 0, True),
             ("price_out_usd_per_mtok", "USD/Mtok out", 4, False), ("advertised_tokens_per_s", "claimed tok/s", 0, False),
             ("measured_tokens_per_s", "measured tok/s", 0, False), ("claim_ratio", "measured ÷ claimed", 2, False),
             ("tokens_per_usd", "tokens per USD", 0, False), ("utilisation", "load", 2, False),
             ("ttft_ms", "TTFT ms", 0, False), ("reputation", "reputation", 2, False),
             ("audits_passed", "audits ✓", 0, False), ("audits_failed", "audits ✗", 0, False),
             ("stake_usd", "stake USD", 4, False), ("earnings_usd", "earnings USD", 6, False),
             ("error_rate", "error rate", 3, False), ("jobs_window", "jobs 24h", 0, False)]


def _status(n: dict) -> str:
    if n["banned"]:
        return "banned"
    if n.get("verify_only"):
        return "operator's verifier" + ("" if n["online"] else " (offline)")
    return "routable" if n["routable"] else f'out: {n["not_routable_because"] or "offline"}'


def nodes_table(snap: dict) -> str:
    head = "".join(f'<th class="{"l" if left else ""}">{escape(label)}</th>' for _, label, _, left in NODE_COLS)
    rows = []
    for n in snap["nodes"]:
        cells = []
        for key, _, digits, left in NODE_COLS:
            if key == "name":
                cells.append(f'<td class="l" data-v="{escape(n["name"])}"><a href="/dashboard/nodes/{escape(n["id"])}">'
                             f'{escape(n["name"])}</a></td>')
            elif key == "status":
                cells.append(_td(_status(n), left=True, cls="why"))
            else:
                cells.append(_td(n[key], digits, left))
        cls = "banned" if n["banned"] else ("" if n["routable"] else "out")
        rows.append(f'<tr data-node-id="{escape(n["id"])}" class="{cls}">{"".join(cells)}</tr>')
    return (f'<p class="note">{len(snap["nodes"])} offers; click a column to sort.</p>'
            f'<table id="nodes-table" class="sortable"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def node_page(offers: list[dict], hist) -> str:
    if not offers:
        return '<p class="empty">No such node.</p>'
    n = offers[0]
    head = kpis([("status", _status(n), "status"), ("price", f'{n["price_out_usd_per_mtok"]:.4f}', "USD/Mtok out"),
                 ("speed", f'{n["measured_tokens_per_s"] or 0:.0f} / {n["advertised_tokens_per_s"] or 0:.0f}',
                  "measured / claimed tok/s"),
                 ("reputation", f'{n["reputation"]:.2f}', "reputation"),
                 ("audits", f'{n["audits_passed"]} ✓ / {n["audits_failed"]} ✗', "audits"),
                 ("earnings", f'{n["earnings_usd"]:.6f}', "USD earnings")])
    times = [r["minute"] for r in hist]  # buckets of the per-minute history (history.node_buckets)
    tt, ss = times, {"requests": [r["requests"] / r["minutes"] for r in hist],
                     "failed": [r["failed"] / r["minutes"] for r in hist]}
    t2, s2 = times, {"load": [r["load"] for r in hist]}
    t3, s3 = times, {"tok/s": [r["tok_s"] for r in hist]}
    t4, s4 = times, {"USD/Mtok out": [None if r["price_out"] is None else r["price_out"] / 1e9 for r in hist]}
    return (f'<p class="note">{escape(n["id"])} · {escape(n["region"])} · {escape(n["engine"])} · '
            f'{escape(", ".join(o["model"] for o in offers))}</p>{head}<div class="grid" id="node-history">'
            f'<div class="card">{charts.lines("node-requests", tt, ss, ylabel="requests per minute")}</div>'
            f'<div class="card">{charts.lines("node-load", t2, s2, ylabel="share of slots busy")}</div>'
            f'<div class="card">{charts.lines("node-speed", t3, s3, ylabel="measured tok/s")}</div>'
            f'<div class="card">{charts.lines("node-price", t4, s4, ylabel="ask")}</div></div>')


def coach(c: dict) -> str:
    usd = 1e9
    loss = c["losses"]
    parts = [kpis([("routable", "yes" if c["routable"] else f'no: {c["not_routable_because"]}', "routable now"),
                   ("reputation", f'{c["reputation"]:.2f}', "reputation"),
                   ("earned", f'{loss["earned_nano_usd"] / usd:.6f}', f'USD earned, last {c["window_hours"]:.0f} h'),
                   ("audit-loss", f'{(loss["clawed_back_nano_usd"] + loss["slashed_nano_usd"]) / usd:.6f}',
                    "USD lost to failed audits (clawed back + slashed)"),
                   ("error-loss", f'{loss["errors_lost_nano_usd"] / usd:.6f}',
                    f'USD of {loss["failed_jobs"]} failed jobs (error rate {loss["error_rate"]:.1%})')])]
    for m in c["models"]:
        s = m["suggestion"]
        rank = (f'#{m["rank"]} of {m["rank_of"]}' if m["rank"] else
                f'misses the median latency target ({m["latency_target_ms"]:.0f} ms) met by {m["rank_of"]} offer(s)')
        win = "–" if m["win_rate"] is None else f'{m["win_rate"]:.0%}'
        parts.append(
            f'<div class="card coach-model" data-model="{escape(m["model"])}"><h2>{escape(m["model"])}</h2>'
            + kpis([("rank", rank, f'in tokens per USD at the median latency target ({m["latency_target_ms"]:.0f} ms '
                                   f'for {m["typical_answer_tokens"]} tokens)'),
                    ("win-rate", win, f'of {m["requests_in_market"]} requests while you were routable'),
                    ("price", f'{m["price_out_usd_per_mtok"]:.4f}', "your USD/Mtok out"),
                    ("suggested-price", f'{s["price_out_usd_per_mtok"]:.4f}', "suggested USD/Mtok out"),
                    ("expected-util", f'{s["expected_utilisation"]:.0%}',
                     f'expected utilisation (now {s["current_utilisation"]:.0%})'),
                    ("backoff-loss", f'{m["backoff_lost_nano_usd"] / usd:.6f}',
                     f'USD lost to {m["minutes_backing_off"]} min backing off')])
            + f'<p class="reason" id="suggestion-reason">{escape(s["reason"])}</p></div>')
    return "".join(parts)


def usage(u: dict) -> str:
    models = "".join(f'<tr>{_td(m["model"], left=True)}{_td(m["requests"])}{_td(m["completion_tokens"])}'
                     f'{_td(m["spend_usd"], 6)}{_td(m["cost_per_request_usd"], 8)}{_td(m["ttft_p50_ms"], 0)}</tr>'
                     for m in u["models"])
    days = sorted({d["day"] for d in u["by_day"]})
    bars = []
    if days:
        top = max(sum(x["spend_usd"] for x in u["by_day"] if x["day"] == d) for d in days) or 1.0
        w = max(8, min(40, 520 // len(days)))
        for i, d in enumerate(days):
            y = 170
            for j, mname in enumerate(sorted({x["model"] for x in u["by_day"]})):
                v = sum(x["spend_usd"] for x in u["by_day"] if x["day"] == d and x["model"] == mname)
                h = 150 * v / top
                y -= h
                bars.append(f'<rect class="bar" data-day="{d}" data-model="{escape(mname)}" data-v="{v:.9g}" '
                            f'x="{40 + i * (w + 4)}" y="{y:.1f}" width="{w}" height="{h:.1f}" fill="{charts.colour(j)}">'
                            f'<title>{d} {escape(mname)}: {v:.6f} USD</title></rect>')
        spend = (f'<svg id="spend-by-day" class="chart" width="580" height="200" role="img" aria-label="spend by day">'
                 f'<text x="40" y="12">USD per day (top {top:.6f})</text>{"".join(bars)}'
                 f'<text x="40" y="190">{days[0]}</text><text x="570" y="190" text-anchor="end">{days[-1]}</text></svg>')
    else:
        spend = '<p id="spend-by-day" class="empty">No spend yet.</p>'
    nodes = "".join(f'<tr>{_td(n["name"], left=True)}{_td(n["requests"])}{_td(n["completion_tokens"])}'
                    f'{_td(n["spend_usd"], 6)}</tr>' for n in u["nodes"])
    recent = "".join(f'<tr>{_td(r["id"], left=True)}{_td(r["model"], left=True)}{_td(r["status"], left=True)}'
                     f'{_td(r["completion_tokens"])}{_td(r["cost_usd"], 8)}{_td(r["ttft_ms"], 0)}'
                     f'{_td(r["node"], left=True)}</tr>' for r in u["recent"])
    return (kpis([("spend", f'{u["total_spend_usd"]:.6f}', f'USD spent, last {u["days"]:.0f} days'),
                  ("requests", str(u["requests"]), "requests")])
            + f'<div class="grid"><div class="card"><h2>Spend by day</h2>{spend}</div>'
            f'<div class="card"><h2>By model</h2><table id="usage-by-model" class="sortable"><thead><tr>'
            f'<th class="l">model</th><th>requests</th><th>tokens out</th><th>USD</th><th>USD / request</th>'
            f'<th>TTFT p50 ms</th></tr></thead><tbody>{models}</tbody></table></div>'
            f'<div class="card"><h2>Nodes that served you</h2><table id="usage-nodes" class="sortable"><thead><tr>'
            f'<th class="l">node</th><th>requests</th><th>tokens out</th><th>USD</th></tr></thead><tbody>{nodes}'
            f'</tbody></table></div></div><h2>Recent requests</h2><table id="usage-recent" class="sortable"><thead><tr>'
            f'<th class="l">request</th><th class="l">model</th><th class="l">status</th><th>tokens out</th>'
            f'<th>USD</th><th>TTFT ms</th><th class="l">node</th></tr></thead><tbody>{recent}</tbody></table>')
