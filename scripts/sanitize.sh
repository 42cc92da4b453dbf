#!/usr/bin/env bash
# The C++ under AddressSanitizer and UndefinedBehaviorSanitizer: a CPU-only build of csrc with
# both, next to the normal one, and the op, property and engine tests run against it. Any
# report aborts the process, which fails this script.
# Usage: scripts/sanitize.sh [PYTHON]      (make sanitize; .ci/run calls it)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
out=build/sanitize

rm -rf "$out/fastvideo_offload"
mkdir -p "$out"
FASTVIDEO_OFFLOAD_SANITIZE=address,undefined FASTVIDEO_OFFLOAD_CPU_ONLY=1 \
  "$py" setup.py -q build_ext --build-lib "$out" --build-temp "$out/tmp" > "$out/build.log" 2>&1 \
  || { tail -30 "$out/build.log"; exit 1; }
# The Python package beside the instrumented library, found first on PYTHONPATH.
(cd fastvideo_offload && find . -name '*.py' -exec install -D -m 644 {} "../$out/fastvideo_offload/{}" \;)

runtime="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export PYTHONPATH="$PWD/$out" LD_PRELOAD="$runtime"
# -P keeps the working directory (and its uninstrumented library) off sys.path.
# Python and torch are not instrumented and keep memory until exit: leaks are not ours to judge.
export ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
"$py" -P -c 'import fastvideo_offload._C as c, sys; assert "/build/sanitize/" in c.__file__, c.__file__; print("sanitized library:", c.__file__)'
# The soak test measures RSS, which ASan's quarantine of freed memory makes meaningless.
"$py" -P -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_properties.py tests/test_enable.py \
  tests/test_reliability.py --deselect tests/test_reliability.py::test_a_thousand_forwards_hold_their_memory
