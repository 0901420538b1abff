#!/usr/bin/env bash
# The built-in engine vs transformers generate() on one CUDA GPU, in one command: for
# tiny-20m, tiny-100m and tiny-1b in bfloat16, bench/engine.py's serving workload (32
# requests), batch-1 decode and decode roofline (against the GPU's own copy bandwidth).
#
#   bash scripts/device_engine_bench.sh                 # on the GPU machine, results in $OUT
#   OUT=/tmp/b DEVICE=cpu DTYPE=float32 MODELS="tiny:300" EXTRA="--quick --requests 6" \
#       PYTHON=.venv/bin/python bash scripts/device_engine_bench.sh      # a dry run on CPU
#
# Each run has its own hard timeout (MODELS entries are name:seconds) and the whole script a
# budget (TOTAL_S): a run that hangs costs its own slot only, a failed run is logged and the
# next one goes on. Everything goes to $OUT/engine_cuda.log; each run's last JSON line (or an
# error record) to $OUT/engine_cuda.jsonl. Generated models go to $AGORA_HOME (default
# /tmp/agora-bench), never to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# No network there: never let transformers or the hub try (a blackholed request could eat a run's slot).
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/agora-engine-bench}
mkdir -p "$OUT"
export AGORA_HOME=${AGORA_HOME:-/tmp/agora-bench}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
MODELS=${MODELS:-"tiny-20m:80 tiny-100m:90 tiny-1b:150"}
ROUNDS=${ROUNDS:-2}
TOTAL_S=${TOTAL_S:-330}
EXTRA=${EXTRA:-}
LOG="$OUT/engine_cuda.log"
JSONL="$OUT/engine_cuda.jsonl"
: > "$LOG"
: > "$JSONL"
start=$SECONDS

say() { echo "$*" | tee -a "$LOG"; }

{
  echo "== environment, $(date -u +%FT%TZ), device $DEVICE, dtype $DTYPE, budget ${TOTAL_S}s"
  nvidia-smi -L || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm,power.limit --format=csv \
    || true
  timeout 60 "$PY" - <<'EOF' || echo "python probe failed (rc $?)"
import platform, sys
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| cuda available", torch.cuda.is_available(), "| threads", torch.get_num_threads())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu 0:", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"sm {p.major}.{p.minor}", f"{p.multi_processor_count} SMs")
import transformers
print("transformers", transformers.__version__)
EOF
  echo "git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), nproc $(nproc), python $PY, AGORA_HOME $AGORA_HOME"
} 2>&1 | tee -a "$LOG"

for entry in $MODELS; do
  model=${entry%%:*}
  limit=${entry#*:}
  [ "$limit" = "$entry" ] && limit=120
  left=$(( TOTAL_S - (SECONDS - start) ))
  if (( left < 30 )); then
    say "== $model: skipped, ${left}s left of the ${TOTAL_S}s budget"
    printf '{"model": "%s", "device": "%s", "dtype": "%s", "error": "skipped: budget spent"}\n' \
      "$model" "$DEVICE" "$DTYPE" >> "$JSONL"
    continue
  fi
  (( limit > left - 5 )) && limit=$(( left - 5 ))
  say "== $model on $DEVICE/$DTYPE, timeout ${limit}s ($(( SECONDS - start ))s into the run)"
  t=$SECONDS
  tmp=$(mktemp)
  # shellcheck disable=SC2086  # EXTRA is a list of flags
  timeout -k 10 "$limit" "$PY" bench/engine.py --device "$DEVICE" --dtype "$DTYPE" --model "$model" \
    --roofline-model "$model" --rounds "$ROUNDS" --no-vllm $EXTRA 2>&1 | tee "$tmp" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  line=$(grep '^{"model"' "$tmp" | tail -n 1)
  rm -f "$tmp"
  if [ "$rc" -eq 0 ] && [ -n "$line" ]; then
    echo "$line" >> "$JSONL"
  else
    why="rc $rc"
    (( rc == 124 || rc == 137 )) && why="timed out after ${limit}s (rc $rc)"
    printf '{"model": "%s", "device": "%s", "dtype": "%s", "error": "%s"}\n' "$model" "$DEVICE" "$DTYPE" "$why" \
      >> "$JSONL"
  fi
  say "== $model: rc $rc after $(( SECONDS - t ))s"
done

{
  echo "== summary ($(( SECONDS - start ))s in all)"
  timeout 30 "$PY" - "$JSONL" <<'EOF' || cat "$JSONL"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "error" in r:
        print(f"{r['model']:>10}: {r['error']}")
        continue
    roof, c = r["roofline"], r["b1_check"]
    print(f"{r['model']:>10} {r['device']}/{r['dtype']}: serving {r['builtin_tok_s']:.0f} vs transformers "
          f"{r['hf_static32_tok_s']:.0f} tok/s = {r['batch32_vs_hf']:.2f}x | batch 1 {r['builtin_b1_tok_s']:.0f} vs "
          f"{r['hf_b1_tok_s']:.0f} tok/s = {r['batch1_vs_hf']:.2f}x | check: top-1 {c['hf_top1_agree']:.0%}, "
          f"logprob diff {c['logprob_mean_abs_diff']:.3f} | roofline {roof['achieved_gb_s']:.0f} of {roof['bandwidth_gb_s']:.0f} GB/s "
          f"= {r['roofline_fraction_b1']:.1%}")
EOF
} 2>&1 | tee -a "$LOG"
