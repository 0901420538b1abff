#!/usr/bin/env bash
# Set up (first run only) and start the embedded market: `agora up` with 3 node agents.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/agora up "$@"
