#!/usr/bin/env bash
# The one call a session with a GPU makes (under 8 minutes on an H100, no network needed): build
# the extension there, run the whole test suite (the CUDA tests included), then the benchmark at
# Wan2.1-14B's block shape with LAYERS blocks (20 by default: the per-block numbers and the
# targets do not depend on the count; scripts/gpu_bench.sh runs all 40 when there is time).
# Writes build.log, tests.txt, bench.json, bench.png and bench.txt under OUTPUT_DIR.
# Usage: scripts/gpu_check.sh [OUTPUT_DIR]     (carry .whl to get the FastVideo and diffusers modes:
#        make gpu-wheels here first)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"

timeout 200 $py -m pytest tests -q -p no:cacheprovider -x 2>&1 | tee "$out/tests.txt" | tail -25
tests=${PIPESTATUS[0]}

timeout 330 $py -m fastvideo_offload bench --layers "${LAYERS:-20}" --steps "${STEPS:-3}" --warmup 1 \
  --time-limit "${BENCH_TIME_LIMIT:-200}" --json "$out/bench.json" --plot "$out/bench.png" 2>&1 \
  | tee "$out/bench.txt" | tail -60
exit "$tests"
