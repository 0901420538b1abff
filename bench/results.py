"""Where every benchmark puts its figures: `emit(name, figures)` in place of the final print.

    from results import emit     # bench/ is on sys.path when a bench runs as a script
    ...
    emit("engine", figures)      # prints the ONE JSON line (last line of stdout), as before,
                                 # and writes bench/results/engine.json for bench/compare.py

A bench that cannot run at all for a stated reason (no GPU, vLLM not installed) calls
`skip(name, reason)`: `bench/compare.py` reports it as skipped, not as a failure. A bench
that crashes writes nothing, and compare.py fails it as missing.

The file is `{"bench", "commit", "dirty", "time", "quick", "figures"}` (or `"skipped"`
instead of figures). The folder is `bench/results/` (git-ignored) unless
`AGORA_BENCH_RESULTS` names another (scripts/bench_regress.sh gives each run a fresh one).
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "bench" / "results"
ENV_DIR = "AGORA_BENCH_RESULTS"


def results_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _finite(x):
    """NaN and infinities as null: JSON has no such numbers, and an undefined ratio is no figure."""
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _record(name: str, **body) -> Path:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    record = {"bench": name, "commit": commit, "dirty": bool(status) if status is not None else None,
              "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "quick": (body.get("figures") or {}).get("quick", "--quick" in sys.argv[1:]), **_finite(body)}
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)  # a reader never sees half a file
    return path


def emit(name: str, figures: dict) -> dict:
    """Print `figures` as the bench's last line of JSON and save them as bench/results/<name>.json."""
    print(json.dumps(figures), flush=True)
    try:
        path = _record(name, figures=figures)
    except (OSError, ValueError) as exc:  # the figures were printed; saving them is not worth a crash
        print(f"bench results: not saved ({exc})", file=sys.stderr)
    else:
        print(f"bench results: {path}", file=sys.stderr)
    return figures


def skip(name: str, reason: str) -> None:
    """Record that the bench did not run, and why (reported as skipped by bench/compare.py)."""
    print(json.dumps({"skipped": reason}), flush=True)
    _record(name, skipped=reason)
