"""Grafana dashboards from code: `python infra/grafana/build.py` writes
`infra/grafana/dashboards/*.json` (plain JSON, no library), which Grafana loads through
`provisioning/dashboards/agora.yml`. `tests/test_infra.py` checks that regenerating gives the
committed files and that every query names only series the code registers.

Series read from the database at scrape time (the market: ledger, audits, nodes,
settlements) are the same on every process scraped: panels take `max` over instances.
Series recorded where they happen (requests, latency, dispatch, settle) are summed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards"
DS = {"type": "prometheus", "uid": "prometheus"}  # provisioning/datasources/prometheus.yml
W, H = 12, 8  # half a row


def target(expr: str, legend: str = "", ref: str = "A") -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(title: str, exprs: list[tuple[str, str]], unit: str = "short", kind: str = "timeseries",
          desc: str = "") -> dict:
    return {"type": kind, "title": title, "description": desc, "datasource": DS,
            "targets": [target(e, legend, chr(ord("A") + i)) for i, (e, legend) in enumerate(exprs)],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []}, "options": {}}


def market(q: str) -> str:
    """A database-derived series: every process reports the same value; take one."""
    return f"max without (instance, job) ({q})"


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    by_le = f"sum by (le{', ' + by if by else ''}) (rate({metric}_bucket[5m]))"
    return [(f"histogram_quantile({q}, {by_le})", f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else ""))
            for q in (0.5, 0.9, 0.99)]


def dashboard(uid: str, title: str, panels: list[dict], desc: str) -> dict:
    laid = []
    for i, p in enumerate(panels):
        laid.append({**p, "id": i + 1, "gridPos": {"h": H, "w": W, "x": (i % 2) * W, "y": (i // 2) * H}})
    return {"uid": uid, "title": title, "description": desc, "tags": ["agora"], "timezone": "utc",
            "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"}, "panels": laid,
            "templating": {"list": []}, "annotations": {"list": []}}


def dashboards() -> dict[str, dict]:
    ask = "agora_ask_price_nano_usd"
    market_panels = [
        panel("Price index: ask per million completion tokens (USD)",
              [(market(f'{ask}{{side="out", quantile="{q}"}}') + " / 1e9", f"p{int(float(q) * 100)} {{{{model}}}}")
               for q in ("0.1", "0.5", "0.9")], unit="currencyUSD",
              desc="Quantiles of routable offers' asks per model"),
        panel("Cost per million tokens actually paid (USD)",
              [(market("rate(agora_ledger_volume_nano_usd_total[15m]) / 1e9")
                + " / (" + market('sum(rate(agora_settled_tokens_total[15m]))') + " / 1e6)", "paid")],
              unit="currencyUSD"),
        panel("Throughput: tokens settled per second",
              [(market('rate(agora_settled_tokens_total{kind="completion"}[5m])'), "completion"),
               (market('rate(agora_settled_tokens_total{kind="prompt"}[5m])'), "prompt"),
               ("sum(rate(agora_tokens_relayed_total[5m]))", "relayed to buyers")], unit="short"),
        panel("Measured decode speed per stream (tok/s)",
              [(market('agora_offer_tokens_per_second{quantile="0.5"}'), "median {{model}}"),
               (market('agora_offer_tokens_per_second{quantile="0.9"}'), "p90 {{model}}")]),
        panel("Time to first token", quantiles("agora_ttft_seconds"), unit="s"),
        panel("Inter-token latency", quantiles("agora_inter_token_seconds"), unit="s"),
        panel("Utilisation (busy slots / capacity of routable nodes)",
              [(market('agora_slots{state="busy"}') + " / clamp_min(" + market('agora_slots{state="capacity"}')
                + ", 1)", "utilisation")], unit="percentunit"),
        panel("Revenue and fees (USD per hour)",
              [(market("rate(agora_ledger_volume_nano_usd_total[15m])") + " * 3600 / 1e9", "volume"),
               (market("rate(agora_ledger_fees_nano_usd_total[15m])") + " * 3600 / 1e9", "platform fees")],
              unit="currencyUSD"),
        panel("Audits by verdict (per hour)",
              [(market("sum by (verdict, reason) (rate(agora_audits_total[15m]))") + " * 3600",
                "{{verdict}} {{reason}}"),
               (market('sum by (status) (agora_audits_open)'), "open: {{status}}")]),
        panel("Slashed stake (USD per hour)",
              [(market('rate(agora_ledger_transfers_nano_usd_total{kind="slash"}[15m])') + " * 3600 / 1e9",
                "slashed")], unit="currencyUSD"),
        panel("Request outcomes (per second)",
              [("sum by (outcome) (rate(agora_requests_total[5m]))", "HTTP {{outcome}}"),
               (market("sum by (status) (rate(agora_requests_finished_total[5m]))"), "{{status}}")]),
        panel("Escrow: holds open",
              [(market("agora_holds_open"), "holds"),
               (market("agora_holds_open_nano_usd") + " / 1e9", "USD held")]),
    ]
    worker_panels = [
        panel("Dispatch batch size", quantiles("agora_dispatch_batch_size"),
              desc="Queued requests routed by one dispatch round"),
        panel("Dispatch round time", quantiles("agora_dispatch_seconds"), unit="s"),
        panel("Queue depth", [(market("agora_requests_queued"), "queued"),
                              (market("sum by (status) (agora_requests_in_flight)"), "{{status}}")]),
        panel("Queue wait", quantiles("agora_queue_wait_seconds", by="path"), unit="s"),
        panel("Settle batch size", quantiles("agora_settle_batch_size")),
        panel("Settle batch time", quantiles("agora_settle_seconds"), unit="s"),
        panel("Task failures and retries (per minute)",
              [("sum by (task) (rate(agora_task_failures_total[5m])) * 60", "failed {{task}}"),
               ("sum by (task) (rate(agora_task_retries_total[5m])) * 60", "retried {{task}}")]),
        panel("Dispatch results (per second)",
              [("sum by (result) (rate(agora_dispatch_requests_total[5m]))", "{{result}}")]),
        panel("Settlements (per second)", [(market("rate(agora_settlements_total[5m])"), "settled")]),
        panel("Processes: CPU seconds per second",
              [("rate(process_cpu_seconds_total{job=~\"agora.*\"}[5m])", "{{job}} {{instance}}")]),
    ]
    node_panels = [
        panel("Routable nodes by engine and region",
              [(market("sum by (engine, region) (agora_nodes_routable)"), "{{engine}} {{region}}")]),
        panel("Routable nodes", [(market("agora_nodes_online"), "routable")], kind="stat"),
        panel("Routable offers per model", [(market("agora_offers_routable"), "{{model}}")]),
        panel("Slots: capacity and busy", [(market("sum by (state) (agora_slots)"), "{{state}}")]),
        panel("Ask vs measured speed per model",
              [(market(f'{ask}{{side="out", quantile="0.5"}}') + " / 1e9", "median ask USD/Mtok {{model}}"),
               (market('agora_offer_tokens_per_second{quantile="0.5"}'), "median tok/s {{model}}")]),
        panel("Scrape health: the market read from the database",
              [("min(agora_metrics_db_up)", "db up"), ("max(agora_metrics_db_seconds)", "read seconds")]),
    ]
    return {
        "agora-market": dashboard("agora-market", "Agora — market", market_panels,
                                  "Price-performance, latency, revenue, audits and outcomes of the market"),
        "agora-workers": dashboard("agora-workers", "Agora — scheduler workers", worker_panels,
                                   "Dispatch and settle batches, the queue, task failures"),
        "agora-nodes": dashboard("agora-nodes", "Agora — nodes", node_panels,
                                 "Routable nodes by engine and region, offers, capacity"),
    }


def render() -> dict[str, str]:
    return {f"{name}.json": json.dumps(d, indent=2, sort_keys=True) + "\n" for name, d in dashboards().items()}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(OUT / name, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
