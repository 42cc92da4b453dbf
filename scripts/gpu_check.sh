#!/usr/bin/env bash
# The one call a session with a GPU makes (about 8 minutes on an H100 at most, no network needed; give the device call timeout_s=600): build
# the extension there, run the whole test suite (the CUDA tests included), then the benchmark at
# Wan2.1-14B's block shape with LAYERS blocks (20 by default: the per-block numbers and the
# targets do not depend on the count; scripts/gpu_bench.sh runs all 40 when there is time).
# Writes build.log, tests.txt, bench.json, bench.png and bench.txt under OUTPUT_DIR.
# Usage: scripts/gpu_check.sh [OUTPUT_DIR]     (carry .whl to get the FastVideo and diffusers modes:
#        make gpu-wheels here first)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"

# The CUDA tests first, then the rest; no -x, so that one failure does not hide the others.
# (FastVideo's CPU tests skip where a GPU exists: FastVideo then picks its CUDA platform.)
tests=0
run_tests() { timeout "$1" $py -m pytest -q -p no:cacheprovider -rs $2 2>&1 | tee -a "$out/tests.txt" | tail -25
           [ "${PIPESTATUS[0]}" = 0 ] || tests=1; }
run_tests 90 tests/test_cuda.py
run_tests 150 "tests --ignore=tests/test_cuda.py"

timeout 240 $py -m fastvideo_offload bench --layers "${LAYERS:-20}" --steps "${STEPS:-3}" --warmup 1 \
  --time-limit "${BENCH_TIME_LIMIT:-180}" --json "$out/bench.json" --plot "$out/bench.png" 2>&1 \
  | tee "$out/bench.txt" | tail -60
exit "$tests"
