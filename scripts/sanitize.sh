#!/usr/bin/env bash
# Builds group_detr._C with AddressSanitizer and UndefinedBehaviorSanitizer and runs the native
# ops' tests against it: the solver, the matcher, the fused matching cost and the fuzz targets.
#
# The build happens in a copy of the working tree outside the repository (SANITIZE_DIR, default
# /tmp/group-detr-sanitize), so the repository's own group_detr/_C*.so is never replaced. Python
# itself is not instrumented: the ASan runtime is preloaded (LD_PRELOAD) and leak checking is
# off (the interpreter's own allocations would drown the report). Any ASan or UBSan finding
# aborts the run with a report, so a clean exit status means no finding.
#
#   bash scripts/sanitize.sh                          # the default budget (~10 min on 2 cores)
#   GROUP_DETR_FUZZ_EXAMPLES=5000 bash scripts/sanitize.sh   # a longer fuzz run
#   bash scripts/sanitize.sh tests/test_fuzz_lsa.py   # only some tests (pytest arguments)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${SANITIZE_DIR:-/tmp/group-detr-sanitize}
PY=${PYTHON:-$ROOT/.venv/bin/python}
case "$OUT" in "$ROOT"|"$ROOT"/*) echo "SANITIZE_DIR must be outside the repository" >&2; exit 2;; esac

# The tracked and untracked (not ignored) files of the working tree: no .so, no build/. Copied
# over an earlier copy with their times kept; since a source edited before the earlier build but
# copied after it would look older than its object, the earlier build is reused only while the
# native sources are the same, byte for byte.
mkdir -p "$OUT"
git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - 2>/dev/null \
  | tar -xf - -C "$OUT"
source_hash=$(git ls-files -z -co --exclude-standard csrc setup.py | xargs -0 sha256sum \
  | sha256sum | cut -d' ' -f1)
if [ "$(cat "$OUT/build/.source-hash" 2>/dev/null)" != "$source_hash" ]; then
  rm -rf "$OUT/build" "$OUT"/group_detr/_C*.so
fi

SAN="-fsanitize=address,undefined -fno-sanitize=vptr -fno-sanitize-recover=undefined"
SAN="$SAN -fno-omit-frame-pointer -g"
# distutils adds CFLAGS/LDFLAGS to every compile and link command of the extension. vptr is
# left out: torch's own (uninstrumented) type information would give false reports.
(cd "$OUT" && GROUP_DETR_FORCE_CPU=1 CFLAGS="$SAN" LDFLAGS="$SAN" \
  nice -n 10 "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1) \
  || { tail -30 "$OUT/build.log"; echo "sanitizer build failed (log: $OUT/build.log)" >&2; exit 1; }
echo "$source_hash" >"$OUT/build/.source-hash"

export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export GROUP_DETR_FUZZ_EXAMPLES=${GROUP_DETR_FUZZ_EXAMPLES:-1000}
cd "$OUT"
# The copy's package and its sanitized extension, not the repository's (the editable install's
# finder comes after the working directory on the import path).
"$PY" - <<'EOF'
import os
import torch  # loads libc10 & co., which the extension links against
import group_detr
import group_detr._C as ext
here = os.getcwd()
assert group_detr.__file__.startswith(here) and ext.__file__.startswith(here), ext.__file__
print("sanitized extension:", ext.__file__, "| backends:", group_detr.backends())
EOF
if [ "$#" -eq 0 ]; then
  set -- tests/test_assignment.py tests/test_matcher.py tests/test_match_cost.py tests/test_group_match.py \
    tests/test_fuzz_lsa.py
fi
nice -n 10 "$PY" -m pytest -q -p no:cacheprovider --hypothesis-show-statistics "$@"
echo "sanitize: no AddressSanitizer or UndefinedBehaviorSanitizer finding (fuzz budget" \
  "$GROUP_DETR_FUZZ_EXAMPLES examples per target)"
