#!/usr/bin/env bash
# The C++ under a sanitizer: a CPU-only build of csrc with it, next to the normal one, and the op,
# property, engine and fault tests run against it. Any report aborts the process, which fails
# this script.
#   address  AddressSanitizer + UndefinedBehaviorSanitizer (make sanitize)
#   thread   ThreadSanitizer, every engine on the asynchronous CPU device, whose copy and
#            release threads race with the host if anything is unordered (make tsan)
# Usage: scripts/sanitize.sh [PYTHON] [address|thread]      (.ci/run runs both)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
kind=${2:-address}
out=build/sanitize-$kind
# The ops, random calls to them, the engine under enable feature by feature, faults and long runs, staging.
tests=(tests/test_ops.py tests/test_properties.py tests/test_enable.py tests/test_tied_weights.py
       tests/test_block_inside_another.py tests/test_state_dict.py tests/test_refusals.py tests/test_mutate.py
       tests/test_autocast.py tests/test_groups.py tests/test_compile.py tests/test_reliability.py tests/test_staging.py)
# The soak test and the mapped-checkpoint test measure RSS, which a sanitizer's shadow memory and
# quarantine make meaningless. Tests marked injected_race plant an ordering fault (a copy that skips
# its release wait, a block that runs before its copy, a staging buffer refilled under an upload):
# real races, which the sanitizers rightly report; the normal builds prove the suite catches them.
deselect=(--deselect tests/test_reliability.py::test_a_thousand_forwards_hold_their_memory
          --deselect tests/test_staging.py::test_staged_blocks_from_a_checkpoint_stay_in_the_page_cache
          -m "not injected_race")
case $kind in
  address)
    flags=address,undefined
    runtime="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
    # Python and torch are not instrumented and keep memory until exit: leaks are not ours to judge.
    export ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0:abort_on_error=1:allocator_may_return_null=1
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    ;;
  thread)
    flags=thread
    runtime="$(gcc -print-file-name=libtsan.so)"
    tests+=(tests/test_async_device.py)
    # Only our threads are judged: torch's OpenMP pool is invisible to TSan (libgomp is not
    # instrumented) and would only report false races inside torch's own kernels.
    export OMP_NUM_THREADS=1 FASTVIDEO_OFFLOAD_CPU_TRANSFER=async
    export TSAN_OPTIONS="halt_on_error=1 allocator_may_return_null=1 second_deadlock_stack=1 log_path=$PWD/$out/report"
    ;;
  *) echo "usage: $0 [PYTHON] [address|thread]" >&2; exit 2 ;;
esac

rm -rf "$out/fastvideo_offload" "$out"/report.*
mkdir -p "$out"
FASTVIDEO_OFFLOAD_SANITIZE=$flags FASTVIDEO_OFFLOAD_CPU_ONLY=1 \
  "$py" setup.py -q build_ext --build-lib "$out" --build-temp "$out/tmp" > "$out/build.log" 2>&1 \
  || { tail -30 "$out/build.log"; exit 1; }
# The Python package beside the instrumented library, found first on PYTHONPATH.
(cd fastvideo_offload && find . -name '*.py' -exec install -D -m 644 {} "../$out/fastvideo_offload/{}" \;)

export PYTHONPATH="$PWD/$out" LD_PRELOAD="$runtime"
# -P keeps the working directory (and its uninstrumented library) off sys.path.
"$py" -P -c 'import fastvideo_offload._C as c; assert "/build/sanitize-" in c.__file__, c.__file__; print("sanitized library:", c.__file__)'
status=0
"$py" -P -m pytest -q -p no:cacheprovider "${tests[@]}" "${deselect[@]}" || status=$?
# TSan writes its reports to files (pytest captures stderr) and exits with 66.
if compgen -G "$out/report.*" > /dev/null; then cat "$out"/report.*; status=1; fi
exit $status
