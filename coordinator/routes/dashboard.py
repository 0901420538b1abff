"""`GET /dashboard`: the operator's price-performance page (HTML, no scripts), and
`GET /dashboard.json`. Needs the admin token (header, or `?token=` for a browser)."""

from __future__ import annotations

import hmac
from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from coordinator.auth import bearer_token
from coordinator.dashboard import snapshot
from coordinator.errors import Forbidden

router = APIRouter(tags=["ops"])


def _admin(request: Request) -> None:
    settings = request.app.state.settings
    token = request.query_params.get("token") or bearer_token(request)
    if not settings.admin_token or not hmac.compare_digest(token, settings.admin_token):
        raise Forbidden("the dashboard needs the operator's admin token")


async def _data(request: Request) -> dict:
    rt = request.app.state.runtime

    def _do():
        with rt.session() as s:
            return snapshot(s, rt.settings)

    return await run_in_threadpool(_do)


@router.get("/dashboard.json")
async def dashboard_json(request: Request):
    _admin(request)
    return await _data(request)


def _scatter(nodes: list[dict], w: int = 520, h: int = 300, pad: int = 44) -> str:
    """Price (y) against measured tok/s (x): bottom-right is the best deal."""
    pts = [n for n in nodes if n["measured_tokens_per_s"]]
    if not pts:
        return "<p>No nodes yet.</p>"
    xmax = max(n["measured_tokens_per_s"] for n in pts) * 1.1
    ymax = max(n["price_out_usd_per_mtok"] for n in pts) * 1.1 or 1.0
    x = lambda v: pad + (w - 2 * pad) * v / xmax  # noqa: E731
    y = lambda v: h - pad - (h - 2 * pad) * v / ymax  # noqa: E731
    dots = "".join(
        f'<circle cx="{x(n["measured_tokens_per_s"]):.1f}" cy="{y(n["price_out_usd_per_mtok"]):.1f}" r="6" '
        f'class="{"bad" if n["banned"] else ("on" if n["online"] else "off")}"><title>{escape(n["name"])}: '
        f'{n["price_out_usd_per_mtok"]:.3f} USD/Mtok, {n["measured_tokens_per_s"]:.0f} tok/s</title></circle>'
        f'<text x="{x(n["measured_tokens_per_s"]) + 8:.1f}" y="{y(n["price_out_usd_per_mtok"]) + 4:.1f}">'
        f'{escape(n["name"])}</text>' for n in pts)
    return (f'<svg width="{w}" height="{h}" role="img" aria-label="price against measured speed">'
            f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}"/><line x1="{pad}" y1="{pad}" '
            f'x2="{pad}" y2="{h - pad}"/><text x="{w / 2 - 60}" y="{h - 10}">measured tok/s (per stream) →</text>'
            f'<text x="4" y="{pad - 12}">USD / M output tokens ↑</text>'
            f'<text x="{pad - 4}" y="{h - pad + 14}">0</text><text x="{w - pad - 30}" y="{h - pad + 14}">'
            f'{xmax:.0f}</text><text x="4" y="{pad + 4}">{ymax:.2f}</text>{dots}</svg>')


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return escape(str(v))


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard(request: Request):
    _admin(request)
    d = await _data(request)
    cols = [("name", "node", 0), ("model", "model", 0), ("region", "region", 0), ("online", "online", 0),
            ("price_out_usd_per_mtok", "USD/Mtok out", 3), ("advertised_tokens_per_s", "claimed tok/s", 0),
            ("measured_tokens_per_s", "measured tok/s", 0), ("claim_ratio", "measured ÷ claimed", 2),
            ("usd_per_mtok_per_tok_s", "USD/Mtok per tok/s", 5), ("utilisation", "utilisation", 2),
            ("ttft_ms", "TTFT ms", 0), ("rtt_ms", "RTT ms", 1), ("reputation", "reputation", 2),
            ("audits_passed", "audits ✓", 0), ("audits_failed", "audits ✗", 0),
            ("revenue_window_usd", "revenue 24h USD", 6), ("earnings_usd", "earnings USD", 6)]
    head = "".join(f"<th>{escape(label)}</th>" for _, label, _ in cols)
    body_rows = "".join(
        ("<tr class='banned'>" if n["banned"] else "<tr>")
        + "".join(f"<td>{_fmt(n[k], digits)}</td>" for k, _, digits in cols) + "</tr>" for n in d["nodes"])
    reqs = ", ".join(f"{escape(k)}: {v}" for k, v in sorted(d["requests"].items())) or "none"
    audits = "".join(f"<li>{escape(a['node_id'][:12])} on {escape(a['request_id'])}: "
                     f"{escape(', '.join(a['reasons'] or []))}</li>" for a in d["failed_audits"]) or "<li>none</li>"
    html = f"""<!doctype html><html><head><meta charset="utf-8"><title>Agora — market</title><style>
body{{font:14px system-ui,sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;margin:12px 0}}
th,td{{padding:4px 8px;border-bottom:1px solid #ddd;text-align:right}} th{{background:#f4f4f4}}
td:first-child,th:first-child,td:nth-child(2),td:nth-child(3){{text-align:left}} tr.banned td{{color:#b00;text-decoration:line-through}}
svg line{{stroke:#888}} svg text{{font-size:11px;fill:#444}} circle.on{{fill:#2a7}} circle.off{{fill:#aaa}} circle.bad{{fill:#c33}}
.kpi{{display:inline-block;margin-right:28px}} .kpi b{{font-size:20px;display:block}}</style></head><body>
<h1>Agora market</h1>
<div><span class="kpi"><b>{sum(n['online'] for n in d['nodes'])}</b>nodes online</span>
<span class="kpi"><b>{d['tokens_window']}</b>tokens, last {d['window_hours']:.0f} h</span>
<span class="kpi"><b>{d['volume_window_usd']:.6f}</b>USD volume, last {d['window_hours']:.0f} h</span>
<span class="kpi"><b>{d['platform_fees_usd']:.6f}</b>USD platform fees</span></div>
<h2>Price against measured speed</h2>{_scatter(d['nodes'])}
<h2>Nodes</h2><table><tr>{head}</tr>{body_rows}</table>
<p>Requests, last {d['window_hours']:.0f} h: {reqs}</p>
<h2>Failed audits</h2><ul>{audits}</ul></body></html>"""
    return HTMLResponse(html)
