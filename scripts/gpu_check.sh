#!/usr/bin/env bash
# On a GPU machine whose python has a CUDA build of torch: builds group_detr._C with the CUDA
# solver (csrc/lsa/lsa_cuda.cu), runs the solver tests (CUDA ones included) and the matcher
# benchmark on CUDA. Usage: scripts/gpu_check.sh   (PYTHON=... to pick the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch, sys; assert torch.version.cuda and torch.cuda.is_available(), 'needs CUDA torch + GPU'; print(torch.__version__, torch.cuda.get_device_name())"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
"$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c "import group_detr; b = group_detr.backends(); print(b); assert b['lsa_cuda'], 'CUDA solver not built'"
"$PY" -m pytest -q -rs tests/test_lsa_cuda.py tests/test_assignment.py tests/test_matcher.py
"$PY" benchmarks/bench_matcher.py --device cuda
