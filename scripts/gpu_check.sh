#!/usr/bin/env bash
# One call on a CUDA machine that already has torch (no network needed): build the extension
# there, run the whole test suite (the CUDA tests included), then a short benchmark.
# Usage: scripts/gpu_check.sh [OUTPUT_DIR]      (well under 8 minutes on an H100)
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"

timeout 300 $py -m pytest tests -q -p no:cacheprovider -x 2>&1 | tail -25
tests=${PIPESTATUS[0]}

timeout 240 $py -m fastvideo_offload bench --layers 8 --steps 4 \
  --json "$out/bench.json" --plot "$out/bench.png" 2>&1 | tail -40
exit "$tests"
