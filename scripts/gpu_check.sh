#!/usr/bin/env bash
# One call on a CUDA machine that already has torch (no network needed): build the extension
# there, run the whole test suite (the CUDA tests included), then a short benchmark.
# Usage: scripts/gpu_check.sh [OUTPUT_DIR]      (well under 8 minutes on an H100)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'

start=$(date +%s)
$py setup.py -q build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
echo "build: $(( $(date +%s) - start )) s"

timeout 300 $py -m pytest tests -q -p no:cacheprovider -x 2>&1 | tail -25
tests=${PIPESTATUS[0]}

timeout 240 $py -m fastvideo_offload bench --layers 8 --steps 4 \
  --json "$out/bench.json" --plot "$out/bench.png" 2>&1 | tail -40
exit "$tests"
