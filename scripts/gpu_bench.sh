#!/usr/bin/env bash
# The benchmark alone, at Wan2.1-14B's full shape (40 blocks of dim 5120, bf16), 480x832 with 81
# frames and the 17-frame short clip, every mode that is installed (carry .whl for FastVideo and
# diffusers: make gpu-wheels): ours (streaming all, and under the device budgets "auto" and a 24 GB
# card's 20 GiB) before the peers, so that the time limit cuts the peers first. Builds first.
# Writes bench.json, bench.txt (table and verdicts, rewritten after every mode), bench.log and
# bench.png under OUTPUT_DIR.
# Limits: setup 10 s, build 120 s, bench 420 s (starting nothing after 300 s); under 9.5 minutes.
# Give the device call timeout_s=600, and run it only with that much device time left after
# gpu_check.sh. No GPU has run it yet.
# Usage: scripts/gpu_bench.sh [OUTPUT_DIR]
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"

setup_part 10
build_part 120 || exit 1
part bench 420 /dev/null bench_part --layers "${LAYERS:-40}" --steps "${STEPS:-3}" --warmup 1 \
  --time-limit "${BENCH_TIME_LIMIT:-300}" --json "$out/bench.json" --table "$out/bench.txt" --plot "$out/bench.png"
