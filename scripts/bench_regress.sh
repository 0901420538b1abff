#!/usr/bin/env bash
# Benchmark regression check: run every bench that bench/baseline.json gates (`--quick` unless
# its entry names other arguments; one after another), then bench/compare.py against the baseline. Exit 1 on a regression beyond
# a key's tolerance or a bench that failed; a bench that skips says why and does not fail.
#
#   bash scripts/bench_regress.sh [RESULTS_DIR]     # default bench/results (emptied first)
#
# BENCH_BUDGET_S (default 1200) caps the whole run: a bench is killed when the budget is
# spent (and counts as failed), so CI keeps its time limit. BENCH_TIMEOUT_S (default 720)
# caps one bench. Logs: RESULTS_DIR/logs/<bench>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
out=${1:-bench/results}
budget=${BENCH_BUDGET_S:-1200}
per_bench=${BENCH_TIMEOUT_S:-720}
mkdir -p "$out/logs" && out=$(cd "$out" && pwd)  # absolute: a bench may change its directory
rm -f "$out"/*.json "$out"/logs/*.log  # a stale file must never stand in for a bench that failed today
export AGORA_BENCH_RESULTS="$out"
benches=$($PY bench/compare.py --benches) || { echo "bench_regress: cannot read bench/baseline.json" >&2; exit 1; }  # "name args..." lines
start=$(date +%s)
fail_record() {  # what compare.py reports for a bench that did not write its figures
  $PY - "$out/$1.json" "$1" "$2" <<'EOF'
import json, sys
path, bench, error = sys.argv[1:]
json.dump({"bench": bench, "error": error}, open(path, "w"))
EOF
}
while read -r b bargs; do
  left=$(( budget - ($(date +%s) - start) ))
  if [ "$left" -le 10 ]; then
    echo "bench_regress: $b not run: the ${budget}s budget is spent" >&2
    fail_record "$b" "not run: BENCH_BUDGET_S=${budget}s spent before it started"
    continue
  fi
  limit=$(( left < per_bench ? left : per_bench ))
  t0=$(date +%s)
  # shellcheck disable=SC2086  # bargs: the baseline's arguments of this bench, word-split on purpose
  timeout --kill-after=20 "$limit" $PY "bench/$b.py" $bargs >"$out/logs/$b.log" 2>&1 </dev/null
  rc=$?
  took=$(( $(date +%s) - t0 ))
  echo "bench_regress: $b $bargs: exit $rc in ${took}s" >&2
  if [ "$rc" -ne 0 ]; then
    why="exit code $rc after ${took}s"; [ "$rc" -eq 124 ] && why="killed after ${took}s (limit ${limit}s)"
    tail -n 15 "$out/logs/$b.log" >&2
    fail_record "$b" "$why; log: $out/logs/$b.log"
  elif [ ! -f "$out/$b.json" ]; then
    fail_record "$b" "exit 0 but no results file: does bench/$b.py call results.emit(\"$b\", ...)?"
  fi
done <<<"$benches"
echo "bench_regress: benches took $(( $(date +%s) - start ))s (budget ${budget}s)" >&2
$PY bench/compare.py "$out"
