# Sourced by gpu_check.sh and gpu_bench.sh: the output folder, `part` (a command under its own
# time limit, its elapsed seconds printed and recorded for the summary), and the two parts both
# scripts start with: installing the packages carried in .whl/ (the GPU machine has no network),
# and building the extension in place against the torch installed there, for that GPU's
# architecture only. `--dry-run` as the first argument: no GPU is expected (CI), and the parts
# that only a GPU machine can run say so instead of running.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dry=0 scale=1
if [ "${1:-}" = --dry-run ]; then
  # A dry run proves code paths, not speed: on a shared CPU its limits are 3x, and torch runs one
  # thread (two spinning intra-op threads on a loaded 2-core machine slow it many times over).
  dry=1 scale=3
  export OMP_NUM_THREADS=1
  shift
fi
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
# The parts' table for the summary, kept outside $out (at most 8 files come back from there).
state=$(mktemp -d)
trap 'rm -rf "$state"' EXIT
t0=$(date +%s)
failed=0
# Seconds between a part's SIGINT (Python stops and reports what it has) and its SIGKILL.
GRACE=5

# record NAME LIMIT TOOK NOTE: one row of the summary's table.
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$state/parts.tsv"; }

# part NAME LIMIT LOG COMMAND...: COMMAND under LIMIT seconds in all (times `scale`; SIGINT GRACE
# seconds before, SIGKILL at the limit), its output shown and appended to LOG (/dev/null: shown
# only). Prints and records the part's elapsed seconds and the total so far; a failure is
# remembered, not fatal.
part() {
  local name=$1 limit=$2 log=$3 start rc took note
  shift 3
  start=$(date +%s)
  echo "== $name (limit $((limit * scale)) s)"
  # A shell function of this file runs under timeout through bash, which inherits it (export -f).
  if declare -F "$1" > /dev/null; then set -- bash -c '"$@"' bash "$@"; fi
  timeout -s INT -k "$GRACE" "$((limit * scale - GRACE))" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  took=$(( $(date +%s) - start ))
  case $rc in
    0) note=ok ;;
    124) note="TIME LIMIT (stopped by SIGINT)" ;;
    137) note="TIME LIMIT (killed)" ;;
    *) note="FAILED (exit $rc)" ;;
  esac
  [ "$rc" = 0 ] || failed=1
  echo "== $name: $note, $took s of $((limit * scale)) (total $(( $(date +%s) - t0 )) s)"
  record "$name" "$limit" "$took" "$note"
  return "$rc"
}

# skipped NAME LIMIT WHY
skipped() {
  echo "== $1: skipped: $3"
  record "$1" "$2" 0 "skipped: $3"
}

install_wheels() {
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && echo "installed from .whl: $(ls .whl | tr '\n' ' ')"
}

# The extension for the lent card's architecture only (a quarter of the build time), then proof
# that it has CUDA kernels: setup.py falls back to a CPU-only build without nvcc.
build_for_card() {
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS; compiler output in $out/build.log"
  $py setup.py -q build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; return 1; }
  $py -c "import torch, fastvideo_offload
assert torch._C._dispatch_has_kernel_for_dispatch_key('fastvideo_offload::pack', 'CUDA'), 'built without CUDA'"
}
# bench_part ARGS...: the bench, its own output (tracebacks, warnings) in bench.log, its table shown.
bench_part() {
  $py -m fastvideo_offload bench "$@" > "$out/bench.log" 2>&1
  local rc=$?
  [ "$rc" = 0 ] || tail -20 "$out/bench.log"
  cat "$out/bench.txt" 2>/dev/null
  return "$rc"
}
export -f install_wheels build_for_card bench_part
export out py

# setup_part LIMIT: the wheels, when the call carried .whl (make gpu-wheels).
setup_part() {
  if [ "$dry" = 1 ]; then
    skipped setup "$1" "dry run: .whl installs only on the GPU machine"
  elif compgen -G ".whl/*.whl" > /dev/null; then
    export PYTHONPATH=/tmp/site:$PYTHONPATH
    part setup "$1" /dev/null install_wheels
  else
    skipped setup "$1" "no .whl carried (the FastVideo and diffusers modes and tests skip)"
  fi
}

# build_part LIMIT ARCH: ARCH (e.g. 9.0) as TORCH_CUDA_ARCH_LIST unless one is set already.
build_part() {
  if [ "$dry" = 1 ]; then
    skipped build "$1" "dry run: the CUDA build is for the GPU machine; the CPU build in place is used"
    return 0
  fi
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-${2:-$($py -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}}
  date +%s > "$state/build_start"  # the summary names the units this build compiled
  part build "$1" /dev/null build_for_card
}
