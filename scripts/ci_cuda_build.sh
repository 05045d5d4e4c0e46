#!/usr/bin/env bash
# The CUDA build, on a machine without a GPU: a second virtual environment with a CUDA build of
# torch, a copy of the source tree built against it (CUDA solver included, with the toolkit that
# setup.py finds), the library imported, and tests/test_cuda_build.py with
# GROUP_DETR_EXPECT_CUDA_BUILD=1 (batched_lsa's CUDA kernel registered, sm_80/sm_90 machine code
# and PTX in the library, the kernel's registers/stack/spills/shared memory within limits) plus
# tests/test_lsa_cuda.py (the CUDA build's CPU paths; its GPU tests skip); then the same build
# as a wheel, checked as a user installs it (libcudart from torch, no CUDA_HOME needed).
#
# The copy keeps the checkout's own in-place build (the CPU torch's group_detr/_C*.so) intact.
# Without a CUDA toolkit it says so and exits 0. Settings (environment):
#   PYTHON            interpreter for the venv (default python3)
#   CUDA_TORCH        torch requirement (default torch==2.14.1, the CUDA 13.0 build; ~5.5 GB)
#   CUDA_PACKAGES     further packages for the venv (default: the test dependencies)
#   CUDA_BUILD_DIR    venv + source copy, reused between runs (default $TMPDIR/group-detr-cuda)
#   CUDA_TESTS        test files to run in the copy (default: the two above)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
CUDA_TORCH=${CUDA_TORCH:-torch==2.14.1}
CUDA_PACKAGES=${CUDA_PACKAGES:-"numpy scipy pillow pytest hypothesis"}
CUDA_BUILD_DIR=${CUDA_BUILD_DIR:-${TMPDIR:-/tmp}/group-detr-cuda}
CUDA_TESTS=${CUDA_TESTS:-"tests/test_cuda_build.py tests/test_lsa_cuda.py"}
VENV=$CUDA_BUILD_DIR/venv
SRC=$CUDA_BUILD_DIR/src
start=$SECONDS
step() { echo "== ci_cuda_build [$((SECONDS - start)) s] $*"; }

# setup.py's own toolkit search decides, so that this script and the build agree.
if ! "$PYTHON" - <<'EOF'
import importlib.util, sys
spec = importlib.util.spec_from_file_location("group_detr_setup", "setup.py")
setup_py = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup_py)
home = setup_py.find_cuda_home()
print("CUDA toolkit:", home)
sys.exit(0 if home else 1)
EOF
then
    echo "ci_cuda_build: no CUDA toolkit (nvcc) found: the CUDA build is skipped"
    exit 0
fi

step "venv $VENV: $CUDA_TORCH $CUDA_PACKAGES"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# One resolution, so that torch's own pins (setuptools<82 for torch 2.11) hold.
# shellcheck disable=SC2086  # CUDA_PACKAGES is a list of requirements
"$VENV/bin/python" -m pip install -q "$CUDA_TORCH" setuptools wheel ninja $CUDA_PACKAGES
"$VENV/bin/python" -c "import torch; assert torch.version.cuda, 'not a CUDA build of torch'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

step "source copy $SRC (its build/ kept while the native sources are unchanged)"
mkdir -p "$SRC"
find "$SRC" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +  # no stale files
git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$SRC"
# The copy keeps the files' times, so a source edited before the kept build/ was made but
# copied after it looks older than its object, and ninja would link a stale one: the kept
# build/ is reused only while the native sources are the same, byte for byte.
source_hash=$(git ls-files -z --cached --others --exclude-standard csrc setup.py \
    | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
if [ "$(cat "$SRC/build/.source-hash" 2>/dev/null)" != "$source_hash" ]; then
    rm -rf "$SRC/build"
fi

step "build against the CUDA torch"
(cd "$SRC" && "$VENV/bin/python" setup.py -q build_ext --inplace)
echo "$source_hash" >"$SRC/build/.source-hash"

step "import and tests: $CUDA_TESTS"
# shellcheck disable=SC2086
(cd "$SRC" && GROUP_DETR_EXPECT_CUDA_BUILD=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    -rs $CUDA_TESTS)

# The same build as a wheel (ninja finds the objects up to date: a link, not a compile), then
# the wheel as a user installs it: libcudart by soname only, cubins + PTX, and an import with
# no CUDA_HOME from outside the tree (tests/test_cuda_build.py, part d).
step "wheel"
rm -rf "$CUDA_BUILD_DIR/dist"
(cd "$SRC" && "$VENV/bin/python" setup.py -q bdist_wheel -d "$CUDA_BUILD_DIR/dist" >/dev/null)
WHEEL=$(ls "$CUDA_BUILD_DIR"/dist/group_detr-*.whl)
step "the wheel's checks: $(basename "$WHEEL")"
(cd "$SRC" && GROUP_DETR_CUDA_WHEEL=$WHEEL "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
    -rs tests/test_cuda_build.py -k wheel)
step "done"
