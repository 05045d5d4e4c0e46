#!/usr/bin/env bash
# Creates .venv (if missing) with the CPU torch and builds group_detr._C in place.
# Works on a fresh machine: nothing outside this script is assumed to be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip setuptools wheel ninja
# torch is pinned: an unpinned torch resolves to a multi-GB CUDA wheel on a CPU machine.
pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# --no-build-isolation: build the extension against the torch installed above.
pip install -q --no-build-isolation -e ".[test,triton,plot,hf]"
python -c "import group_detr; print('group_detr backends:', group_detr.backends())"
