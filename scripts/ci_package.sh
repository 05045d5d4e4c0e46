#!/usr/bin/env bash
# The release as a user gets it: build the sdist, build a wheel from it and install that into a
# fresh virtual environment (no editable install, no source tree on the path), then run the
# tests that need no repository files, and a one-epoch demo, from outside the checkout.
# Needs .venv from scripts/install.sh (for `build`). One compile of the extension (~2 min).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"
step() { echo "== $1 ($(date -u +%T))"; }

step "sdist"
.venv/bin/pip install -q build
.venv/bin/python -m build --no-isolation --sdist --outdir "$WORK/dist" . > "$WORK/build.log"
SDIST=$(ls "$WORK"/dist/group_detr-*.tar.gz)

step "fresh environment, wheel from the sdist"
"${PYTHON:-python3}" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip setuptools wheel ninja
"$VPY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
"$VPY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" "$SDIST"
WHEEL=$(ls "$WORK"/dist/group_detr-*.whl)
"$VPY" -m pip install -q "$WHEEL[test]"

step "installed-package tests, outside the tree"
mkdir -p "$WORK/tree/benchmarks"
cp -r tests "$WORK/tree/"
cp benchmarks/workloads.py benchmarks/workloads.json "$WORK/tree/benchmarks/"
cd "$WORK/tree"
"$VPY" - "$ROOT" <<'PY'
import sys
import group_detr
assert not group_detr.__file__.startswith(sys.argv[1]), group_detr.__file__
backends = group_detr.backends()
assert backends["lsa_cpu"] and backends["group_match_cpu"], backends
print("installed:", group_detr.__file__, group_detr.__version__, backends)
PY
"$VPY" -m pytest -q -p no:cacheprovider tests/test_assignment.py tests/test_fuzz_lsa.py \
    tests/test_matcher.py tests/test_match_cost.py tests/test_group_match.py tests/test_mask_cost.py \
    tests/test_client_compat.py tests/test_layout.py tests/test_attention.py

step "one-epoch demo on a tiny synthetic set"
"$VPY" -m group_detr demo --epochs 1 --num-train-images 32 --num-val-images 8 \
    --data-dir "$WORK/data" --output-dir "$WORK/runs/demo" | tail -3
step "done"
