#!/usr/bin/env bash
# Every GPU result in one command, for a lent GPU machine with no package registry (the device
# image: Python 3.12, a CUDA torch, Triton, nvcc, compute-sanitizer; no pycocotools, no lapx).
#
#   bash scripts/gpu_check.sh          # on the GPU machine, in a copy of this repository
#
# Steps, in order of value, each with its own time cap inside one overall budget
# (GPU_CHECK_BUDGET seconds, default 420: the run ends well inside a 10-minute command and leaves
# a 15-minute lease room for a rerun of the steps that failed):
#   wheels      carried wheels (.device-wheels/, made by `scripts/device_twin.sh --wheels`)
#               installed with `pip --no-index --no-deps --target`, nothing else installed
#   build       group_detr._C built in place against the image's torch (setup.py finds the
#               toolkit; sm_80 + sm_90 + sm_90 PTX), then tests/test_cuda_build.py with
#               GROUP_DETR_EXPECT_CUDA_BUILD=1 (CUDA kernel registered, cubins/PTX, resources)
#   --- from here a GPU is needed (without one the run stops here: the CPU rehearsal) ---
#   tests_lsa   CUDA solver tests: test_lsa_cuda.py (CUDA graph capture/replay,
#               set_sync_debug_mode("error")), test_assignment.py, test_matcher.py, test_no_sync.py
#   tests_attn  Triton on CUDA: test_attention_kernels.py, test_attention.py
#   bench_*     bench_matcher.py --device cuda, bench_attention.py --device cuda,
#               bench_train_step.py --full --device cuda (results/*-<gpu>.json)
#   memcheck, racecheck   compute-sanitizer on a subset of the CUDA solver tests
#   tests_all   the rest of the suite, if time is left
# Everything lands under $OUT (default $TMPDIR/gpu-check-out): gpu_check.log (all output),
# summary.txt (step, exit status, seconds) and results.tar.gz (benchmark results, junit XML, sanitizer
# logs); at most 8 files, as the device tool brings back.
# Settings: PYTHON (default python3), GPU_CHECK_BUDGET, GPU_CHECK_REHEARSAL=1 (a machine without
# a GPU: stop with status 0 at the first step that needs one), GPU_CHECK_ONLY="step names" (a
# rerun of some steps on a machine still warm, e.g. "build tests_attn"), MAX_JOBS (build, default
# nproc).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-${TMPDIR:-/tmp}/gpu-check-out}
BUDGET=${GPU_CHECK_BUDGET:-420}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT/work"
exec > >(tee "$OUT/gpu_check.log") 2>&1
start=$SECONDS
failed=0
: > "$OUT/summary.txt"
touch "$OUT/work/.started"  # result files newer than this go into results.tar.gz

# step NAME CAP_SECONDS COMMAND...: runs COMMAND with the smaller of its cap and the time left.
step() {
    local name=$1 cap=$2 left rc t0
    shift 2
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [ "$name" != wheels ] \
            && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then
        echo "$name skipped-only 0" >> "$OUT/summary.txt"
        return 0
    fi
    left=$((BUDGET - (SECONDS - start)))
    [ "$cap" -lt "$left" ] || cap=$left
    if [ "$cap" -lt 15 ]; then
        echo "== $name: skipped, budget spent"
        echo "$name skipped-budget 0" >> "$OUT/summary.txt"
        return 0
    fi
    echo "== $name [t=$((SECONDS - start)) s, cap ${cap} s]: $*"
    t0=$SECONDS
    timeout --kill-after=10 "$cap" "$@"
    rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    echo "$name $rc $((SECONDS - t0))" >> "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || failed=1
    return 0
}

pytest_step() {  # pytest_step NAME CAP FILES/ARGS...: junit XML kept for the results
    local name=$1 cap=$2
    shift 2
    step "$name" "$cap" "$PY" -m pytest -q -rs -p no:cacheprovider \
        --junitxml="$OUT/work/$name.xml" "$@"
}

existing() {  # the test files of the arguments that exist in this tree
    local f
    for f in "$@"; do [ -e "$f" ] && printf '%s ' "$f"; done
}

# --- wheels: what the image lacks, carried ------------------------------------------------------
if compgen -G ".device-wheels/*.whl" > /dev/null; then
    SITE=$OUT/work/site
    step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" .device-wheels/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" - <<'EOF'
import importlib.util, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "CUDA", torch.version.cuda,
      "| GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("triton", "numpy", "scipy", "hypothesis", "pytest", "pycocotools", "lap"):
    spec = importlib.util.find_spec(name)
    print(f"  {name}: {'missing' if spec is None else spec.origin}")
EOF
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv

# --- build ---------------------------------------------------------------------------------------
export GROUP_DETR_EXPECT_CUDA_BUILD=1
# 240 s: ~1 min on the device's 16 cores; a loaded 2-core twin needs GPU_CHECK_BUILD_CAP=900.
step build "${GPU_CHECK_BUILD_CAP:-240}" "$PY" setup.py -q build_ext --inplace
pytest_step tests_build 90 tests/test_cuda_build.py

# --- from here on a GPU is needed ---------------------------------------------------------------
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "== no GPU visible: the run stops before the first step that needs one"
    if [ "${GPU_CHECK_REHEARSAL:-0}" = 1 ]; then
        echo "== rehearsal ends here (failed steps so far: $failed)"
        exit "$failed"
    fi
    exit 1
fi

# shellcheck disable=SC2046  # word splitting of the file list is meant
pytest_step tests_lsa 150 $(existing tests/test_lsa_cuda.py tests/test_assignment.py \
    tests/test_matcher.py tests/test_no_sync.py)
# shellcheck disable=SC2046
pytest_step tests_attn 150 $(existing tests/test_attention_kernels.py tests/test_attention.py)
step bench_matcher 90 "$PY" benchmarks/bench_matcher.py --device cuda --repeats 20 --warmup 3
step bench_attention 90 "$PY" benchmarks/bench_attention.py --device cuda
step bench_train_step 150 "$PY" benchmarks/bench_train_step.py --full --device cuda --repeats 10

SANITIZER=$(command -v compute-sanitizer || true)
[ -n "$SANITIZER" ] || SANITIZER=$("$PY" -c "import importlib.util, os
spec = importlib.util.spec_from_file_location('s', 'setup.py'); m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m); home = m.find_cuda_home() or ''
path = os.path.join(home, 'bin', 'compute-sanitizer'); print(path if os.path.isfile(path) else '')")
if [ -n "$SANITIZER" ]; then
    SOLVER_TESTS="(test_cuda_matches_cpu and (uniform or ties or inf) and (4x5x9 or 3x7x0 or 2x33x33 or 2x300x100)) or test_cuda_bad_inputs_raise"
    # No caching allocator under memcheck: an out-of-bounds access inside a cached block is seen.
    step memcheck 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck \
        --error-exitcode 1 --log-file "$OUT/work/memcheck.log" \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_lsa_cuda.py -k "$SOLVER_TESTS"
    step racecheck 90 "$SANITIZER" --tool racecheck --error-exitcode 1 \
        --log-file "$OUT/work/racecheck.log" \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_lsa_cuda.py -k "$SOLVER_TESTS"
else
    echo "== compute-sanitizer not found: memcheck and racecheck skipped"
fi
ran=(tests/test_lsa_cuda.py tests/test_assignment.py tests/test_matcher.py tests/test_no_sync.py
     tests/test_attention_kernels.py tests/test_attention.py tests/test_cuda_build.py
     tests/test_kernel_aot.py)  # the AOT compile test is CI's: it needs no GPU
pytest_step tests_all 300 tests "${ran[@]/#/--ignore=}"

# --- results -------------------------------------------------------------------------------------
echo "== total $((SECONDS - start)) s; failed steps: $failed"
cat "$OUT/summary.txt"
mapfile -t results < <(find benchmarks/results -type f -newer "$OUT/work/.started")
tar -czf "$OUT/results.tar.gz" --exclude=site -C "$OUT" work -C "$PWD" "${results[@]}"
tar -tzf "$OUT/results.tar.gz"
exit "$failed"
