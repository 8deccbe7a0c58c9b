#!/usr/bin/env bash
# One prepared run for a lent GPU machine (issue 15): build a LLaMA-7B-shaped random bf16 model, prune it on the GPU,
# and print peak GPU memory, the seconds and memory of each pruning stage, and the export's decode speed against the
# dense model (transformers `generate`). The machine has torch, transformers, peft, safetensors and accelerate, but
# no vLLM, no FastAPI and no internet: this package goes in with --no-deps, and nothing here imports server/ or vllm.
#
#   scripts/gpu_check.sh                                 # LLaMA-2-7B shape on cuda (about 14 GB of bf16 weights)
#   scripts/gpu_check.sh --shape tiny --device cpu       # the same steps at a tiny width, on the CPU (tests run this)
#   scripts/gpu_check.sh --help                          # every option (scripts/gpu_check.py)
#
# The summary is printed as JSON and written to $OUT/gpu_check.json when $OUT is set (else --out or the work dir).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
if ! "$PYTHON" -m pip show hywia >/dev/null 2>&1; then
  # No index to reach: no dependencies and no isolated build environment (setuptools is already there).
  "$PYTHON" -m pip install --no-deps --no-build-isolation -q -e . || echo "pip install failed: running from the checkout"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PYTHON" scripts/gpu_check.py "$@"
