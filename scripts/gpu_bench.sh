#!/usr/bin/env bash
# One call on a CUDA machine that already has torch: build the extension, then the benchmark at
# Wan2.1-14B's block shape, 480x832 with 81 frames and the 17-frame short clip, every mode that is
# installed. Writes bench.json, bench.png and bench.txt under OUTPUT_DIR.
# Usage: scripts/gpu_bench.sh [OUTPUT_DIR]      (LAYERS=40 by default; under 8 minutes on an H100)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"

timeout 450 $py -m fastvideo_offload bench --layers "${LAYERS:-40}" --steps "${STEPS:-3}" --warmup 1 \
  --json "$out/bench.json" --plot "$out/bench.png" 2>&1 | tee "$out/bench.txt" | tail -60
