#!/usr/bin/env bash
# The lent GPU machine's image, twinned on this CPU machine: Python 3.12 (pyenv), torch 2.11.0
# (the CUDA 13.0 build, from the package index), Triton 3.6.0, numpy/scipy/hypothesis/pytest as
# the image has them, and no pycocotools or lapx. In that venv, on a copy of the source tree:
#   1. the CUDA build of group_detr._C (linked, loaded, batched_lsa's CUDA kernel registered,
#      sm_80/sm_90 + PTX, kernel resources: scripts/ci_cuda_build.sh with this venv's settings);
#   2. the CPU test suite (tests needing pycocotools must skip cleanly);
#   3. the Triton interpreter tests (TRITON_INTERPRET=1) and, if present, the AOT compile test;
#   4. scripts/gpu_check.sh rehearsed up to its first step that needs a GPU, with the wheels
#      carried to the device (.device-wheels/) installed the device's way.
#
#   bash scripts/device_twin.sh            # everything (first run ~10 min of downloads + build)
#   bash scripts/device_twin.sh --wheels   # only (re)make .device-wheels/ for the device run
#
# Settings: TWIN_DIR (venv + source copy, reused; default $TMPDIR/group-detr-twin), PYTHON312.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
TWIN_DIR=${TWIN_DIR:-${TMPDIR:-/tmp}/group-detr-twin}
# The image's versions (/work/.library/device/KINDS.md: python 3.12.3, torch 2.11.0+cu130,
# triton 3.6.0); the rest as there or near.
TWIN_TORCH="torch==2.11.0"
TWIN_PACKAGES="triton==3.6.0 numpy scipy pillow pytest hypothesis matplotlib"
# What the image lacks and the device run needs, carried as wheels for CPython 3.12 x86-64.
DEVICE_WHEELS="pycocotools==2.0.11 lapx==0.11.1"
start=$SECONDS
step() { echo "== device_twin [$((SECONDS - start)) s] $*"; }
failures=()
check() {  # check NAME COMMAND...: runs every check, the summary at the end says which failed
    local name=$1
    shift
    step "$name"
    "$@" || failures+=("$name")
}

make_wheels() {
    step "wheels for the device: $DEVICE_WHEELS -> .device-wheels/"
    rm -rf .device-wheels && mkdir -p .device-wheels
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .device-wheels $DEVICE_WHEELS
    ls -l .device-wheels
}

if [ "${1:-}" = "--wheels" ]; then
    make_wheels
    exit 0
fi
[ -n "$(ls .device-wheels/*.whl 2>/dev/null)" ] || make_wheels

PYTHON312=${PYTHON312:-}
if [ -z "$PYTHON312" ]; then
    for candidate in "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 \
                     "$(command -v python3.12 || true)"; do
        [ -x "$candidate" ] && PYTHON312=$candidate && break
    done
fi
[ -n "$PYTHON312" ] || { echo "device_twin: no Python 3.12 (pyenv install 3.12)"; exit 1; }
VENV=$TWIN_DIR/venv
SRC=$TWIN_DIR/src

# 1. venv, source copy, CUDA build and its tests.
PYTHON=$PYTHON312 CUDA_TORCH=$TWIN_TORCH CUDA_PACKAGES=$TWIN_PACKAGES CUDA_BUILD_DIR=$TWIN_DIR \
    bash scripts/ci_cuda_build.sh
if "$VENV/bin/python" -c "import pycocotools" 2>/dev/null; then
    echo "device_twin: pycocotools is installed in $VENV, unlike on the device"; exit 1
fi
"$VENV/bin/python" -c "import torch, triton, sys; print(sys.version.split()[0], torch.__version__, \
torch.version.cuda, triton.__version__)"

cd "$SRC"
# 2. the CPU suite, as CI runs it, less the files that 1 and 3 run.
# shellcheck disable=SC2046
check "CPU test suite" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfEs \
    --ignore=tests/test_cuda_build.py --ignore=tests/test_lsa_cuda.py \
    --ignore=tests/test_kernel_aot.py $(ls tests/test_attention*.py | sed 's/^/--ignore=/')
# 3. Triton: the interpreter must be switched on before triton's first import, so in a process
# of its own; then the AOT compile of every kernel configuration, if the test exists.
# shellcheck disable=SC2046
check "Triton interpreter tests" env TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q \
    -p no:cacheprovider -rfEs $(ls tests/test_attention*.py)
if [ -e tests/test_kernel_aot.py ]; then
    check "Triton AOT compile test" "$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfEs \
        tests/test_kernel_aot.py
else
    step "tests/test_kernel_aot.py does not exist yet: skipped"
fi
# 4. the device command, up to its first GPU step, with the carried wheels.
rm -rf .device-wheels && cp -r "$REPO/.device-wheels" .device-wheels
check "gpu_check.sh rehearsal" env OUT="$TWIN_DIR/gpu-check-out" PYTHON="$VENV/bin/python" \
    GPU_CHECK_REHEARSAL=1 GPU_CHECK_BUILD_CAP=900 bash scripts/gpu_check.sh
if [ ${#failures[@]} -gt 0 ]; then
    step "FAILED: ${failures[*]}"
    exit 1
fi
step "done: the twin passed"
