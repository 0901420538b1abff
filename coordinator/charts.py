"""Server-rendered SVG charts for the dashboards: no scripts, no CDN, readable offline.

`scatter` draws one point per item (x, y, colour by group, radius by size); `lines` draws
time series sharing one time axis. Both put the numbers in `<title>` tooltips and mark each
point or series with data attributes, so a browser test can read what is drawn.
"""

from __future__ import annotations

from datetime import datetime
from html import escape

PALETTE = ("#2b7bb9", "#e07b39", "#3a9a5b", "#c0392b", "#8e6cbf", "#8c6d31", "#d35fb7", "#7f7f7f")


def _nice(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.1f}"
    return f"{v:.3g}"


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _frame(chart_id: str, w: int, h: int, pad: int, xlabel: str, ylabel: str, xmin: str, xmax: str,
           ymax: float, inner: str, legend: str = "", extra_h: int = 0) -> str:
    return (f'<svg id="{escape(chart_id)}" class="chart" viewBox="0 0 {w} {h + extra_h}" width="{w}" '
            f'height="{h + extra_h}" role="img" '
            f'aria-label="{escape(ylabel)} against {escape(xlabel)}">'
            f'<line class="axis" x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}"/>'
            f'<line class="axis" x1="{pad}" y1="12" x2="{pad}" y2="{h - pad}"/>'
            f'<text x="{pad}" y="{h - pad + 14}">{escape(xmin)}</text>'
            f'<text x="{w - 10}" y="{h - pad + 14}" text-anchor="end">{escape(xmax)}</text>'
            f'<text x="{w / 2:.0f}" y="{h - 6}" text-anchor="middle">{escape(xlabel)}</text>'
            f'<text x="{pad - 4}" y="20" text-anchor="end">{_nice(ymax)}</text>'
            f'<text x="{pad - 4}" y="{h - pad}" text-anchor="end">0</text>'
            f'<text x="{pad + 4}" y="10" class="ylabel">{escape(ylabel)}</text>{inner}{legend}</svg>')


def scatter(chart_id: str, points: list[dict], *, xlabel: str, ylabel: str, w: int = 560, h: int = 320,
            pad: int = 48) -> str:
    """points: {x, y, label, group, size (0..1), key} — bottom-right is fast and cheap."""
    pts = [p for p in points if p.get("x") is not None and p.get("y") is not None]
    if not pts:
        return f'<p id="{escape(chart_id)}" class="empty">No live offers yet.</p>'
    xmax = max(p["x"] for p in pts) * 1.1 or 1.0
    ymax = max(p["y"] for p in pts) * 1.1 or 1.0
    groups = sorted({p.get("group") or "" for p in pts})
    gi = {g: i for i, g in enumerate(groups)}

    def sx(v: float) -> float:
        return pad + (w - pad - 10) * v / xmax

    def sy(v: float) -> float:
        return h - pad - (h - pad - 12) * v / ymax

    dots = "".join(
        f'<circle class="point" data-key="{escape(str(p.get("key", "")))}" data-x="{p["x"]:.6g}" data-y="{p["y"]:.6g}" '
        f'cx="{sx(p["x"]):.1f}" cy="{sy(p["y"]):.1f}" r="{4 + 8 * min(1.0, max(0.0, p.get("size") or 0)):.1f}" '
        f'fill="{colour(gi[p.get("group") or ""])}" fill-opacity="0.75">'
        f'<title>{escape(p.get("label", ""))}</title></circle>' for p in pts)
    legend = "".join(f'<g class="legend"><circle cx="{pad + 8 + 110 * i}" cy="{h + 6}" r="4" fill="{colour(i)}"/>'
                     f'<text x="{pad + 16 + 110 * i}" y="{h + 10}">{escape(g or "—")}</text></g>'
                     for i, g in enumerate(groups))
    return _frame(chart_id, w, h, pad, xlabel, ylabel, "0", _nice(xmax), ymax, dots, legend, extra_h=18)


def lines(chart_id: str, times: list[datetime], series: dict[str, list[float | None]], *, ylabel: str,
          w: int = 560, h: int = 220, pad: int = 48) -> str:
    """Several series over one time axis; None is a gap."""
    vals = [v for s in series.values() for v in s if v is not None]
    if not times or not vals:
        return f'<p id="{escape(chart_id)}" class="empty">No history yet: the first minute is written a minute after traffic.</p>'
    ymax = max(vals) * 1.1 or 1.0
    t0, t1 = times[0].timestamp(), times[-1].timestamp()
    span = (t1 - t0) or 60.0

    def sx(t: datetime) -> float:
        return pad + (w - pad - 10) * (t.timestamp() - t0) / span

    def sy(v: float) -> float:
        return h - pad - (h - pad - 12) * v / ymax

    paths, legend = [], []
    for i, (name, ys) in enumerate(series.items()):
        segs, cur = [], []
        for t, v in zip(times, ys):
            if v is None:
                if cur:
                    segs.append(cur)
                cur = []
            else:
                cur.append(f"{sx(t):.1f},{sy(v):.1f}")
        if cur:
            segs.append(cur)
        d = " ".join("M" + " L".join(s) for s in segs)
        dots = "".join(f'<circle cx="{s[0].split(",")[0]}" cy="{s[0].split(",")[1]}" r="2.5" fill="{colour(i)}"/>'
                       for s in segs if len(s) == 1)  # a lone minute is a dot, not an invisible path
        last = next((v for v in reversed(ys) if v is not None), None)
        paths.append(f'<path class="series" data-series="{escape(name)}" data-points="{sum(len(s) for s in segs)}" '
                     f'data-last="{"" if last is None else f"{last:.6g}"}" d="{d}" fill="none" stroke="{colour(i)}" '
                     f'stroke-width="1.8"><title>{escape(name)}: last {"–" if last is None else _nice(last)}</title></path>'
                     + dots)
        lx, ly = pad + 8 + 120 * (i % 4), h + 6 + 14 * (i // 4)
        legend.append(f'<g class="legend"><rect x="{lx}" y="{ly - 4}" width="10" height="3" '
                      f'fill="{colour(i)}"/><text x="{lx + 14}" y="{ly}">{escape(name)}</text></g>')
    fmt = "%H:%M" if span <= 86400 else "%m-%d %H:%M"
    return _frame(chart_id, w, h, pad, "time (UTC)", ylabel, times[0].strftime(fmt), times[-1].strftime(fmt), ymax,
                  "".join(paths), "".join(legend), extra_h=8 + 14 * (-(-len(series) // 4)))


def bucket(times: list[datetime], series: dict[str, list[float | None]], max_points: int = 240,
           how: dict[str, str] | None = None) -> tuple[list[datetime], dict[str, list[float | None]]]:
    """Fewer points for long windows: consecutive rows merged by mean (or "sum"/"max" per series)."""
    n = len(times)
    if n <= max_points:
        return times, series
    step = -(-n // max_points)
    how = how or {}
    out_t = [times[i] for i in range(0, n, step)]
    out: dict[str, list[float | None]] = {}
    for name, ys in series.items():
        agg = how.get(name, "mean")
        col: list[float | None] = []
        for i in range(0, n, step):
            chunk = [v for v in ys[i:i + step] if v is not None]
            if not chunk:
                col.append(None)
            elif agg == "sum":
                col.append(sum(chunk))
            elif agg == "max":
                col.append(max(chunk))
            else:
                col.append(sum(chunk) / len(chunk))
        out[name] = col
    return out_t, out
