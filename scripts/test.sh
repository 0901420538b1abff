#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite: the main suite, then the slow
# multi-process suites. Extra arguments go to both pytest runs (e.g. -x, -k name).
# pytest's exit code 5 ("no tests collected") counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
run() {
  .venv/bin/python -m pytest "$@"
  rc=$?
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; return 1; fi
  return "$rc"
}
run -m "not slow" -q "$@" || exit $?
run -m "slow" -q "$@" || exit $?
