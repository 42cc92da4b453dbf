#!/usr/bin/env bash
# The benchmark alone, at Wan2.1-14B's full shape (40 blocks of dim 5120, bf16), 480x832 with 81
# frames and the 17-frame short clip, every mode that is installed (carry .whl for FastVideo and
# diffusers: make gpu-wheels). Builds first. Writes bench.json, bench.png and bench.txt under
# OUTPUT_DIR. Usage: scripts/gpu_bench.sh [OUTPUT_DIR]     (under 8 minutes on an H100)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"

timeout 420 $py -m fastvideo_offload bench --layers "${LAYERS:-40}" --steps "${STEPS:-3}" --warmup 1 \
  --time-limit "${BENCH_TIME_LIMIT:-300}" --json "$out/bench.json" --plot "$out/bench.png" 2>&1 \
  | tee "$out/bench.txt" | tail -60
