#!/usr/bin/env bash
# Create .venv (if missing) and install Agora with everything the demo and tests need.
# torch is pinned to 2.13.0, a CPU build this machine holds on local disk, before the
# project's `torch>=2.4` range is resolved, so pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.agora-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
# Chromium for the browser tests (tests/e2e/test_dashboard_browser.py drives Debian's
# chromium headless through Playwright; Playwright never downloads a browser here). Only
# when it is missing, so an installed machine pays one `test -x`. Not fatal: without it the
# browser tests skip and say why. AGORA_SKIP_CHROMIUM=1 skips the install.
if [ ! -x /usr/bin/chromium ] && [ -z "${AGORA_SKIP_CHROMIUM:-}" ]; then
  apt_get() {
    if [ "$(id -u)" -eq 0 ]; then DEBIAN_FRONTEND=noninteractive apt-get "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo -n env DEBIAN_FRONTEND=noninteractive apt-get "$@"
    else echo "not root and no passwordless sudo" >&2; return 1; fi
  }
  echo "setup: installing Debian's chromium for the browser tests (apt-get install chromium)..." >&2
  if command -v apt-get >/dev/null 2>&1 && { apt_get install -y -q chromium >/tmp/agora-chromium-apt.log 2>&1 ||
       { apt_get update -q >>/tmp/agora-chromium-apt.log 2>&1 && apt_get install -y -q chromium >>/tmp/agora-chromium-apt.log 2>&1; }; }; then
    echo "setup: chromium installed: $(/usr/bin/chromium --version 2>/dev/null)" >&2
  else
    echo "setup: WARNING: could not install chromium (see /tmp/agora-chromium-apt.log);" \
         "the browser tests in tests/e2e/test_dashboard_browser.py will SKIP" >&2
  fi
fi
