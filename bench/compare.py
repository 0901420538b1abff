"""Compare a folder of benchmark results with the accepted figures in bench/baseline.json.

    .venv/bin/python bench/compare.py [RESULTS_DIR]            # default bench/results; exit 1 on a regression
    .venv/bin/python bench/compare.py --update DIR [DIR ...]   # rewrite baseline.json's values (median of DIRs)
    .venv/bin/python bench/compare.py --spread DIR DIR [...]   # run-to-run spread per key, to choose tolerances
    .venv/bin/python bench/compare.py --benches                # the gated benches and their arguments, one a line

Each results file is what `bench/results.py` writes (`emit` / `skip`). baseline.json holds, per
bench, per key (a dotted path into the bench's JSON: `channel_vs_http.core_share_ratio`):

    "args": ["--quick", ...]    # per bench: how scripts/bench_regress.sh runs it (default --quick)
    "not_in_ci": "why"          # per bench: bench_regress.sh leaves it out; compared when its file is there
    {"value": 3.1, "better": "higher" | "lower" | "equal",
     "tolerance": 0.25          # relative: a regression is worse than value by more than 25 % of it
     | "abs_tolerance": 0.01,   # absolute, for rates near 0 or 1 (false positives, detection)
     "report_only": "why",      # shown, never fails (too noisy to gate on; the spread says so)
     "skip_note": "path",       # where the bench states why the key may be null (vLLM absent)
     "noise": "..."}            # the measured run-to-run spread the tolerance was taken from

Verdicts: ok (within tolerance), improved (better by more than the tolerance: consider
`--update`), REGRESSED, FAILED (the bench crashed or timed out: scripts/bench_regress.sh records
its exit), MISSING (no results file, or the key absent or null without a stated reason), skipped (the bench or the key's section did not run, for the reason it
states), report (report-only key), no baseline (value null: run `--update`). The exit code is 1
if any key REGRESSED, FAILED or is MISSING, else 0.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
BASELINE = HERE / "baseline.json"
RESULTS = HERE / "results"
FAILING = ("REGRESSED", "MISSING", "FAILED")


@dataclass
class Row:
    key: str  # bench.key
    base: object
    now: object
    tolerance: str
    verdict: str
    note: str = ""

    @property
    def change(self) -> str:
        if not _num(self.base) or not _num(self.now):
            return ""
        if self.base == 0:
            return f"{self.now - self.base:+.4g} abs"
        return f"{(self.now - self.base) / abs(self.base):+.1%}"


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def lookup(figures, path: str):
    """A dotted path into nested dicts and lists; None where any step is absent."""
    cur = figures
    for part in path.split("."):
        if isinstance(cur, dict):
            cur = cur.get(part)
        elif isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return None
        if cur is None:
            return None
    return cur


def load_results(folder: Path) -> dict[str, dict]:
    """bench name -> its record ({"figures": ...} or {"skipped": reason}); a raw JSON line counts as figures."""
    out = {}
    for path in sorted(Path(folder).glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            out[path.stem] = {"error": f"unreadable {path.name}: {exc}"}
            continue
        if not isinstance(rec, dict):
            out[path.stem] = {"error": f"{path.name} is not a JSON object"}
        elif "figures" in rec or "skipped" in rec or "error" in rec:
            out[rec.get("bench") or path.stem] = rec
        else:
            out[path.stem] = {"figures": rec}
    return out


def allowed(spec: dict) -> float:
    if spec.get("abs_tolerance") is not None:
        return float(spec["abs_tolerance"])
    return float(spec.get("tolerance", 0.0)) * abs(spec["value"])


def tolerance_text(spec: dict) -> str:
    if spec.get("report_only"):
        return "report only"
    if spec.get("better") == "equal":
        return "exact"
    if spec.get("abs_tolerance") is not None:
        return f"±{spec['abs_tolerance']:g} abs"
    return f"{float(spec.get('tolerance', 0.0)):.0%}"


def judge(spec: dict, now) -> tuple[str, str]:
    """(verdict, note) of one key's figure against its baseline entry."""
    base, better = spec.get("value"), spec.get("better", "higher")
    if better not in ("higher", "lower", "equal"):
        raise ValueError(f"better must be higher, lower or equal, not {better!r}")
    if spec.get("report_only"):
        return "report", str(spec["report_only"])
    if base is None:
        return "no baseline", "value is null: run bench/compare.py --update"
    if better == "equal":
        return ("ok", "") if now == base else ("REGRESSED", f"expected {base!r}")
    if not _num(now):
        return "MISSING", f"not a number: {now!r}"
    slack = allowed(spec)
    worse = (base - now) if better == "higher" else (now - base)
    if worse > slack:
        return "REGRESSED", f"{better} is better"
    if -worse > slack:
        return "improved", "beyond tolerance: consider --update"
    return "ok", ""


def compare(baseline: dict, results: dict[str, dict]) -> list[Row]:
    rows = []
    for bench, entry in baseline["benches"].items():
        rec = results.get(bench)
        keys = entry.get("keys", {})
        for key, spec in keys.items():
            name = f"{bench}.{key}"
            tol = tolerance_text(spec)
            if rec is None and entry.get("not_in_ci"):
                rows.append(Row(name, spec.get("value"), None, tol, "skipped", f"not run in CI: {entry['not_in_ci']}"))
                continue
            if rec is None:
                rows.append(Row(name, spec.get("value"), None, tol, "MISSING", "no results file: the bench failed or did not run"))
                continue
            if rec.get("error"):
                rows.append(Row(name, spec.get("value"), None, tol, "FAILED", str(rec["error"])))
                continue
            if rec.get("skipped"):
                rows.append(Row(name, spec.get("value"), None, tol, "skipped", str(rec["skipped"])))
                continue
            now = lookup(rec.get("figures"), key)
            if now is None:
                why = lookup(rec.get("figures"), spec["skip_note"]) if spec.get("skip_note") else None
                if isinstance(why, list):
                    match = spec.get("skip_match", "")
                    why = "; ".join(str(w) for w in why if match in str(w)) or None
                if why:
                    rows.append(Row(name, spec.get("value"), None, tol, "skipped", str(why)[:200]))
                elif spec.get("report_only"):
                    rows.append(Row(name, spec.get("value"), None, tol, "report", "absent"))
                else:
                    rows.append(Row(name, spec.get("value"), None, tol, "MISSING", "key absent or null, no reason stated"))
                continue
            verdict, note = judge(spec, now)
            rows.append(Row(name, spec.get("value"), now, tol, verdict, note))
    return rows


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def table(rows: list[Row]) -> str:
    head = ("key", "baseline", "now", "change", "tolerance", "verdict")
    cells = [head] + [(r.key, _fmt(r.base), _fmt(r.now), r.change, r.tolerance, r.verdict) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = []
    for i, c in enumerate(cells):
        line = "  ".join(v.ljust(w) for v, w in zip(c, widths))
        if i and rows[i - 1].note:
            line += f"  ({rows[i - 1].note})"
        lines.append(line.rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary(rows: list[Row], results: dict, baseline: dict) -> tuple[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    failed = sum(counts.get(v, 0) for v in FAILING)
    extra = sorted(set(results) - set(baseline["benches"]))
    text = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
    if extra:
        text += f"; results not in the baseline (not gated): {', '.join(extra)}"
    commits = sorted({str(r.get('commit'))[:10] for r in results.values() if r.get("commit")})
    if commits:
        text += f"; measured at {', '.join(commits)}"
    verdict = f"FAIL: {failed} key(s) regressed, failed or missing" if failed else "PASS"
    return f"{text}\n{verdict}", (1 if failed else 0)


def update(baseline: dict, folders: list[Path]) -> tuple[dict, list[str]]:
    """New baseline values: the median over the folders of each key's figure; keys no run measured keep theirs."""
    runs = [load_results(f) for f in folders]
    said = []
    for bench, entry in baseline["benches"].items():
        recs = [r[bench] for r in runs if bench in r and r[bench].get("figures") is not None]
        if not recs:
            said.append(f"{bench}: no figures in {', '.join(map(str, folders))}: values kept")
            continue
        for key, spec in entry.get("keys", {}).items():
            vals = [lookup(r["figures"], key) for r in recs]
            vals = [v for v in vals if v is not None]
            if not vals:
                said.append(f"{bench}.{key}: not measured: value kept ({spec.get('value')!r})")
                continue
            if all(_num(v) for v in vals):
                new = statistics.median(vals)
                new = float(f"{new:.6g}") if isinstance(new, float) else new  # 6 significant digits
            else:
                new = vals[-1]
            if new != spec.get("value"):
                said.append(f"{bench}.{key}: {spec.get('value')!r} -> {new!r}")
            spec["value"] = new
        entry["measured"] = sorted({str(r.get("commit"))[:10] for r in recs if r.get("commit")}) or entry.get("measured")
    return baseline, said


def spread(folders: list[Path], baseline: dict) -> str:
    """Per baseline key: every run's figure, min, max and (max - min) / median."""
    runs = [load_results(f) for f in folders]
    lines = [f"{'key':55s} {'runs':40s} spread"]
    for bench, entry in baseline["benches"].items():
        for key in entry.get("keys", {}):
            vals = [lookup(r.get(bench, {}).get("figures"), key) for r in runs]
            nums = [v for v in vals if _num(v)]
            sp = ""
            if len(nums) > 1:
                med = statistics.median(nums)
                sp = f"{(max(nums) - min(nums)) / abs(med):.1%}" if med else f"{max(nums) - min(nums):.4g} abs"
            lines.append(f"{bench + '.' + key:55s} {', '.join(_fmt(v) for v in vals):40s} {sp}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", type=Path, help="results folder(s) (default bench/results)")
    ap.add_argument("--baseline", type=Path, default=BASELINE)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--update", action="store_true", help="rewrite the baseline's values from the results folder(s)")
    mode.add_argument("--spread", action="store_true", help="run-to-run spread of each key over several folders")
    mode.add_argument("--benches", action="store_true", help="print the gated benches, each with its arguments")
    args = ap.parse_args(argv)
    try:
        baseline = json.loads(args.baseline.read_text())
    except (OSError, ValueError) as exc:
        ap.error(f"--baseline {args.baseline}: {exc}")
    if args.benches:
        for name, entry in baseline["benches"].items():
            if not entry.get("not_in_ci"):
                print(" ".join([name, *entry.get("args", ["--quick"])]))
        return 0
    folders = args.results or [RESULTS]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing and (args.update or args.spread):
        ap.error(f"results folder not found: {', '.join(missing)}")
    if args.spread:
        print(spread(folders, baseline))
        return 0
    if args.update:
        new, said = update(baseline, folders)
        args.baseline.write_text(json.dumps(new, indent=2, ensure_ascii=False) + "\n")
        print("\n".join(said) or "no value changed")
        print(f"{args.baseline} rewritten from {', '.join(map(str, folders))}: review the diff and commit it")
        return 0
    if len(folders) != 1:
        ap.error("compare takes one results folder")
    results = load_results(folders[0]) if folders[0].is_dir() else {}
    rows = compare(baseline, results)
    print(f"benchmark figures in {folders[0]} vs {args.baseline.name}")
    print(table(rows))
    text, rc = summary(rows, results, baseline)
    print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
