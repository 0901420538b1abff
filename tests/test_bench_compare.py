"""bench/compare.py (benchmark regression tracking) on synthetic results, bench/results.py's
files, and the checked-in bench/baseline.json."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


compare = _load("compare")
results = _load("results")

BASELINE = {
    "benches": {
        "engine": {"keys": {
            "batch32_vs_hf": {"value": 4.0, "better": "higher", "tolerance": 0.2, "noise": "synthetic"},
            "chunked_p99_itl_ratio": {"value": 2.0, "better": "lower", "tolerance": 0.25},
            "vs_vllm": {"value": 1.4, "better": "higher", "tolerance": 0.2, "skip_note": "vllm_skipped"},
            "roofline_fraction_b1": {"value": 0.5, "better": "higher", "report_only": "bandwidth probe too noisy"},
        }},
        "verify": {"keys": {
            "false_positive_rate": {"value": 0.0, "better": "lower", "abs_tolerance": 0.01},
            "detection_rate_min": {"value": 1.0, "better": "higher", "abs_tolerance": 0.0},
            "modes.int4.detection_rate": {"value": 1.0, "better": "higher", "abs_tolerance": 0.05},
        }},
        "ledger": {"keys": {"pg_books_ok": {"value": True, "better": "equal"}}},
    }
}

GOOD = {
    "engine": {"batch32_vs_hf": 3.9, "chunked_p99_itl_ratio": 2.1, "vs_vllm": 1.5, "roofline_fraction_b1": 0.5},
    "verify": {"false_positive_rate": 0.004, "detection_rate_min": 1.0, "modes": {"int4": {"detection_rate": 0.98}}},
    "ledger": {"pg_books_ok": True},
}


def write_results(folder: Path, figures: dict[str, dict], skipped: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, figs in figures.items():
        (folder / f"{name}.json").write_text(json.dumps({"bench": name, "commit": "abc1234", "figures": figs}))
    for name, reason in (skipped or {}).items():
        (folder / f"{name}.json").write_text(json.dumps({"bench": name, "skipped": reason}))
    return folder


def run(tmp_path: Path, figures: dict, skipped=None, baseline=BASELINE) -> tuple[int, str, dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps(baseline))
    folder = write_results(tmp_path / "res", figures, skipped)
    proc = subprocess.run([sys.executable, str(BENCH / "compare.py"), str(folder), "--baseline", str(base)],
                          capture_output=True, text=True, timeout=60)
    rows = {r.key: r for r in compare.compare(baseline, compare.load_results(folder))}
    return proc.returncode, proc.stdout, rows


def with_(figures: dict, bench: str, **changes) -> dict:
    out = json.loads(json.dumps(figures))
    out[bench].update(changes)
    return out


def test_figures_within_tolerance_pass(tmp_path):
    rc, out, rows = run(tmp_path, GOOD)
    assert rc == 0, out
    assert out.strip().endswith("PASS")
    assert {r.verdict for r in rows.values()} == {"ok", "report"}
    # the table: key, baseline, now, change, tolerance, verdict
    line = next(ln for ln in out.splitlines() if ln.startswith("engine.batch32_vs_hf"))
    assert line.split()[1:] == ["4", "3.9", "-2.5%", "20%", "ok"]


def test_regression_beyond_tolerance_fails(tmp_path):
    rc, out, rows = run(tmp_path, with_(GOOD, "engine", batch32_vs_hf=3.1))  # -22.5 %, tolerance 20 %
    assert rc == 1
    assert rows["engine.batch32_vs_hf"].verdict == "REGRESSED"
    assert "FAIL: 1 key(s) regressed" in out and "REGRESSED" in out


def test_lower_is_better_and_absolute_tolerances(tmp_path):
    rc, _, rows = run(tmp_path, with_(GOOD, "engine", chunked_p99_itl_ratio=2.6))  # +30 % where lower is better
    assert rc == 1 and rows["engine.chunked_p99_itl_ratio"].verdict == "REGRESSED"
    rc, _, rows = run(tmp_path, with_(GOOD, "verify", false_positive_rate=0.02))  # +0.02 > ±0.01 abs, from 0
    assert rc == 1 and rows["verify.false_positive_rate"].verdict == "REGRESSED"
    assert rows["verify.false_positive_rate"].change == "+0.02 abs"
    rc, _, rows = run(tmp_path, with_(GOOD, "verify", detection_rate_min=0.99))  # one cheat missed: no tolerance
    assert rc == 1 and rows["verify.detection_rate_min"].verdict == "REGRESSED"
    rc, _, rows = run(tmp_path, with_(GOOD, "verify", modes={"int4": {"detection_rate": 0.9}}))  # nested key
    assert rc == 1 and rows["verify.modes.int4.detection_rate"].verdict == "REGRESSED"


def test_a_boolean_that_changes_fails(tmp_path):
    rc, _, rows = run(tmp_path, with_(GOOD, "ledger", pg_books_ok=False))
    assert rc == 1 and rows["ledger.pg_books_ok"].verdict == "REGRESSED"


def test_improvement_passes_and_is_shown(tmp_path):
    rc, out, rows = run(tmp_path, with_(GOOD, "engine", batch32_vs_hf=6.0, chunked_p99_itl_ratio=1.2))
    assert rc == 0, out
    assert rows["engine.batch32_vs_hf"].verdict == "improved"
    assert rows["engine.chunked_p99_itl_ratio"].verdict == "improved"
    line = next(ln for ln in out.splitlines() if ln.startswith("engine.batch32_vs_hf"))
    assert "+50.0%" in line and "improved" in line and "--update" in line


def test_missing_key_fails(tmp_path):
    figs = json.loads(json.dumps(GOOD))
    del figs["engine"]["batch32_vs_hf"]
    rc, out, rows = run(tmp_path, figs)
    assert rc == 1
    assert rows["engine.batch32_vs_hf"].verdict == "MISSING"
    # null with no reason stated is missing too (a section that silently did not run)
    rc, _, rows = run(tmp_path, with_(GOOD, "engine", batch32_vs_hf=None))
    assert rc == 1 and rows["engine.batch32_vs_hf"].verdict == "MISSING"


def test_a_bench_that_failed_to_run_fails(tmp_path):
    figs = {k: v for k, v in GOOD.items() if k != "verify"}  # no verify.json: it crashed
    rc, out, rows = run(tmp_path, figs)
    assert rc == 1
    assert all(rows[k].verdict == "MISSING" for k in rows if k.startswith("verify."))
    assert "no results file" in out
    (tmp_path / "res" / "verify.json").write_text('{"figures": {"false_pos')  # half a file
    assert compare.load_results(tmp_path / "res")["verify"]["error"].startswith("unreadable")
    # what scripts/bench_regress.sh writes for a bench that exited non-zero or timed out
    (tmp_path / "res" / "verify.json").write_text(json.dumps({"bench": "verify", "error": "exit code 1 after 12s"}))
    rows = {r.key: r for r in compare.compare(BASELINE, compare.load_results(tmp_path / "res"))}
    assert rows["verify.false_positive_rate"].verdict == "FAILED" and "exit code 1" in rows["verify.false_positive_rate"].note


def test_skipped_for_a_stated_reason_is_reported_not_failed(tmp_path):
    figs = {k: v for k, v in GOOD.items() if k != "ledger"}
    figs = with_(figs, "engine", vs_vllm=None, vllm_skipped="--quick: vLLM start-up alone takes about 35 s")
    rc, out, rows = run(tmp_path, figs, skipped={"ledger": "PostgreSQL not reachable"})
    assert rc == 0, out
    assert rows["ledger.pg_books_ok"].verdict == "skipped" and rows["ledger.pg_books_ok"].note == "PostgreSQL not reachable"
    assert rows["engine.vs_vllm"].verdict == "skipped" and "vLLM start-up" in rows["engine.vs_vllm"].note
    assert "2 skipped" in out


def test_a_bench_left_out_of_ci_is_skipped_when_absent_and_compared_when_present(tmp_path):
    baseline = json.loads(json.dumps(BASELINE))
    baseline["benches"]["engine"]["not_in_ci"] = "too slow for CI's budget"
    figs = {k: v for k, v in GOOD.items() if k != "engine"}
    rc, out, rows = run(tmp_path, figs, baseline=baseline)
    assert rc == 0, out
    assert rows["engine.batch32_vs_hf"].verdict == "skipped" and "not run in CI" in rows["engine.batch32_vs_hf"].note
    rc, _, rows = run(tmp_path / "2", with_(GOOD, "engine", batch32_vs_hf=2.0), baseline=baseline)
    assert rc == 1 and rows["engine.batch32_vs_hf"].verdict == "REGRESSED"
    base = tmp_path / "b.json"
    base.write_text(json.dumps(baseline))
    listed = subprocess.run([sys.executable, str(BENCH / "compare.py"), "--benches", "--baseline", str(base)],
                            capture_output=True, text=True, timeout=60).stdout.split("\n")
    assert [ln.split()[0] for ln in listed if ln] == ["verify", "ledger"]


def test_report_only_keys_never_fail(tmp_path):
    rc, _, rows = run(tmp_path, with_(GOOD, "engine", roofline_fraction_b1=0.01))
    assert rc == 0 and rows["engine.roofline_fraction_b1"].verdict == "report"


def test_update_rewrites_values_from_the_median_and_keeps_the_rules(tmp_path):
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps(BASELINE))
    runs = [write_results(tmp_path / f"r{i}", with_(GOOD, "engine", batch32_vs_hf=v, vs_vllm=None))
            for i, v in enumerate((5.0, 6.0, 5.5))]
    proc = subprocess.run([sys.executable, str(BENCH / "compare.py"), "--update", *map(str, runs), "--baseline", str(base)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "engine.batch32_vs_hf: 4.0 -> 5.5" in proc.stdout and "commit it" in proc.stdout
    new = json.loads(base.read_text())
    spec = new["benches"]["engine"]["keys"]["batch32_vs_hf"]
    assert spec == {**BASELINE["benches"]["engine"]["keys"]["batch32_vs_hf"], "value": 5.5}
    assert new["benches"]["engine"]["measured"] == ["abc1234"]
    assert compare.compare(new, compare.load_results(runs[0]))[0].verdict == "ok"
    # a key no run measured keeps its value
    assert new["benches"]["engine"]["keys"]["vs_vllm"]["value"] == 1.4


def test_emit_prints_the_json_line_last_and_writes_what_compare_reads(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(results.ENV_DIR, str(tmp_path / "res"))
    figures = {"batch32_vs_hf": 4.1, "undefined_ratio": float("nan"), "quick": True}
    results.emit("engine", figures)
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1].replace("NaN", "null"))["batch32_vs_hf"] == 4.1
    rec = json.loads((tmp_path / "res" / "engine.json").read_text())
    assert rec["bench"] == "engine" and rec["quick"] is True and rec["time"]
    assert rec["figures"]["undefined_ratio"] is None  # strict JSON: no NaN in the file
    assert re.fullmatch(r"[0-9a-f]{40}", rec["commit"] or "")
    results.skip("verify", "vLLM not installed")
    loaded = compare.load_results(tmp_path / "res")
    assert loaded["engine"]["figures"]["batch32_vs_hf"] == 4.1
    assert loaded["verify"]["skipped"] == "vLLM not installed"


# ---------------------------------------------------------------- the checked-in baseline and benches
def test_checked_in_baseline_is_well_formed():
    baseline = json.loads((BENCH / "baseline.json").read_text())
    assert baseline["benches"]
    for bench, entry in baseline["benches"].items():
        src = (BENCH / f"{bench}.py").read_text()
        assert f'emit("{bench}"' in src, f"bench/{bench}.py must write its results with emit({bench!r}, ...)"
        for key, spec in entry["keys"].items():
            where = f"{bench}.{key}"
            assert spec["better"] in ("higher", "lower", "equal"), where
            if spec.get("report_only") or spec["better"] == "equal":
                continue
            assert ("tolerance" in spec) != ("abs_tolerance" in spec), f"{where}: one of tolerance / abs_tolerance"
            assert spec.get("noise"), f"{where}: say which measured spread the tolerance comes from"
            assert isinstance(spec["value"], (int, float)), where


def test_every_bench_with_a_quick_mode_uses_emit():
    """New benches (bench/*.py with --quick) write their figures through bench/results.py."""
    for path in sorted(BENCH.glob("*.py")):
        src = path.read_text()
        if re.search(r'add_argument\(\s*"--quick"', src):
            assert re.search(r"\bemit\(\s*\"" + path.stem + '"', src), f"{path.name}: use results.emit({path.stem!r}, figures)"


def test_cli_lists_the_gated_benches():
    proc = subprocess.run([sys.executable, str(BENCH / "compare.py"), "--benches"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    baseline = json.loads((BENCH / "baseline.json").read_text())
    lines = [ln.split() for ln in proc.stdout.splitlines()]
    assert [ln[0] for ln in lines] == [b for b, e in baseline["benches"].items() if not e.get("not_in_ci")]
    assert all("--quick" in ln[1:] for ln in lines)  # CI runs the quick benches only
