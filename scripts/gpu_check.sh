#!/usr/bin/env bash
# The one call a session with a GPU makes first (no network needed; carry .whl if made). In order,
# each part under its own time limit (SIGINT 5 s before it, so that Python stops and reports what
# it has, then SIGKILL), each printing its elapsed seconds and the total so far:
#   setup        10 s  the wheels carried in .whl/ (make gpu-wheels), if any
#   probe        20 s  before building: kernel, driver, nvcc, ulimit -l, pinned H2D GB/s on 1 GiB,
#                      cudaHostAlloc of 4 GiB, cudaHostRegister on a memfd mapping and a copy from
#                      it, one thread's memcpy GB/s (scripts/gpu_probe.py: torch and ctypes only)
#   build       120 s  the extension for the lent card's architecture only; the summary names its
#                      slowest compile units (from ninja's log)
#   correctness  40 s  EXACT or MISMATCH per case: prefetch 0/1/2, staged from pageable memory and
#                      from a mapped checkpoint, a device budget all and half resident, each with
#                      lagging compute, and the bytes per step of the budget cases
#                      (python -m fastvideo_offload.bench.correctness)
#   cuda tests   90 s  tests/test_cuda.py, 30 s per test: a hung test is interrupted, or killed and
#                      pytest restarted on the rest, and a summary prints (scripts/gpu_tests.py)
#   gpu tests    30 s  the tests marked `cuda` outside test_cuda.py (CI runs the CPU suite)
#   bench        75 s  resident, ours p1, "ours pin 3 blocks" and "ours budget auto" at Wan2.1-14B's
#                      block shape, 8 blocks, 2 timed steps, each scenario's model built once: the
#                      main scenario, the short clip, the Wan2.2 pair, hooks, packing and the staging
#                      ring, nothing started after 40 s. The peers and all 40 blocks: gpu_bench.sh
#   summary       5 s  one screen, printed and written to summary.txt (scripts/gpu_summary.py)
# 390 s of limits, 6.5 minutes (`--limits` prints them; the script refuses more, and
# tests/test_gpu_check.py checks the sum): give the device call timeout_s=420. No GPU has run this
# script yet. Writes at most 8 files under OUTPUT_DIR: probe.txt, build.log, correctness.txt,
# tests.txt (pytest's output and the summaries), bench.json, bench.txt (the bench's table and
# verdicts, rewritten after every mode, so a bench cut off keeps them), bench.log and summary.txt.
# No plot (a ninth file): report.plot(json.load(open("OUT/bench.json")), "bench.png") draws it here.
# Exit status 1 if any part failed or ran out of time.
#
# `--dry-run` (make gpu-check-dry, in CI): no GPU needed; every Python file the real run executes
# runs, on the CPU device and small, so that a typo or a missing file fails CI, not the first GPU
# call: the probe (its CUDA calls report their errors), the correctness script (on the asynchronous
# CPU device), both test selections (their tests skip without a GPU), the bench and the summary.
# Setup and the CUDA build are reported as skipped. The limits are 3x (a shared CPU proves code
# paths, not speed) and torch runs one thread: 31 s on a quiet 2-core VM (30 s of CPU), 150-180 s
# while other work loaded it to 10-15.
# Usage: scripts/gpu_check.sh [--dry-run] [OUTPUT_DIR]     scripts/gpu_check.sh --limits
set -uo pipefail

# Part limits in seconds: the call's whole time is at most their sum.
LIMITS="setup=10 probe=20 build=120 correctness=40 cuda_tests=90 gpu_tests=30 bench=75 summary=5"
MAX_TOTAL=390
total=0
for entry in $LIMITS; do
  declare "limit_${entry%%=*}=${entry#*=}"
  total=$((total + ${entry#*=}))
done
if [ "${1:-}" = --limits ]; then
  tr ' ' '\n' <<< "$LIMITS"
  exit 0
fi
if [ "$total" -gt "$MAX_TOTAL" ]; then
  echo "gpu_check.sh: the parts' limits add up to $total s, more than $MAX_TOTAL s" >&2
  exit 2
fi
source "$(dirname "$0")/gpu_env.sh"
echo "gpu_check.sh$([ "$dry" = 1 ] && echo " --dry-run (limits x$scale)"): writing to $out; parts' limits $total s"
rm -f "$out"/{probe.txt,build.log,correctness.txt,tests.txt,bench.json,bench.txt,bench.log,summary.txt}

setup_part "$limit_setup"

dry_flag=$([ "$dry" = 1 ] && echo --dry-run)
part probe "$limit_probe" "$out/probe.txt" $py scripts/gpu_probe.py $dry_flag

build_part "$limit_build" "$(sed -n 's/^arch: \([0-9.]*\).*/\1/p' "$out/probe.txt" 2>/dev/null)"
built=$?

if [ "$built" = 0 ]; then
  if [ "$dry" = 1 ]; then
    # The CPU's stand-in for a copy engine: copies on a thread, delayed, slots poisoned.
    correctness_env=(env FASTVIDEO_OFFLOAD_CPU_TRANSFER=async)
  else
    correctness_env=(env)
  fi
  # Each part's own limits inside, in seconds. The supervisor of the tests ignores the part's SIGINT:
  # at its deadline it stops pytest (SIGINT, 6 s for pytest's summary, SIGKILL) and summarizes.
  part correctness "$limit_correctness" "$out/correctness.txt" "${correctness_env[@]}" \
    $py -m fastvideo_offload.bench.correctness --time-limit $(( (limit_correctness - 15) * scale ))

  tests=($py scripts/gpu_tests.py --log "$out/tests.txt")
  pytest_args=(-q -p no:cacheprovider -rfE --durations=5)
  part "cuda tests" "$limit_cuda_tests" /dev/null "${tests[@]}" --title "CUDA tests" --per-test $((30 * scale)) \
    --deadline $(( limit_cuda_tests * scale - 8 )) -- "${pytest_args[@]}" tests/test_cuda.py
  part "gpu tests" "$limit_gpu_tests" /dev/null "${tests[@]}" --title "GPU tests outside test_cuda.py" \
    --per-test $((12 * scale)) --grace 3 --deadline $(( limit_gpu_tests * scale - 8 )) --marker cuda \
    --exclude tests/test_cuda.py -- "${pytest_args[@]}"

  bench=(--steps 2 --warmup 1 --modes "resident,ours p1,ours pin 3 blocks,ours budget auto"
         --sections main,short_clip,wan22,hooks,pack_GBps,staging_GBps --time-limit $((40 * scale)))
  if [ "$dry" = 1 ]; then
    bench+=(--device cpu --layers 4 --frames 1 --height 64 --width 64)
  else
    bench+=(--layers 8)
  fi
  part bench "$limit_bench" /dev/null bench_part "${bench[@]}" --json "$out/bench.json" --table "$out/bench.txt"
else
  for name in correctness "cuda tests" "gpu tests" bench; do
    skipped "$name" "$(eval echo "\$limit_${name// /_}")" "the build failed"
  done
  failed=1
fi

# The summary's own row is its limit: it is written before its time is known.
record summary "$limit_summary" "-" "ok"
timeout -s INT -k 2 $((limit_summary * scale - 2)) $py scripts/gpu_summary.py "$out" "$state" \
  --elapsed $(( $(date +%s) - t0 )) $dry_flag || failed=1
exit "$failed"
