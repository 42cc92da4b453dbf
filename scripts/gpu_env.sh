# Sourced by gpu_check.sh and gpu_bench.sh: the output folder, the packages carried in .whl/
# (the GPU machine has no network), and the extension built in place against the torch already
# installed there, for that GPU's architecture only (a quarter of the build time), under a
# BUILD_TIMEOUT (120 s by default). Every part prints its elapsed seconds and the total so far,
# so a call cut off still says where its time went.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${1:-${OUT:-gpu-out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
py=${PYTHON:-python3}
t0=$(date +%s)
# took NAME START: one part's elapsed seconds, and the script's so far.
took() { echo "== $1: $(( $(date +%s) - $2 )) s (total $(( $(date +%s) - t0 )) s)"; }

start=$t0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if compgen -G ".whl/*.whl" > /dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} && echo "installed from .whl: $(ls .whl | tr '\n' ' ')"
fi
$py -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$($py -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
took setup "$start"

start=$(date +%s)
timeout "${BUILD_TIMEOUT:-120}" $py setup.py -q build_ext --inplace > "$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log"; took "build (failed or timed out)" "$start"; exit 1; }
took "build for sm_$TORCH_CUDA_ARCH_LIST" "$start"
# setup.py falls back to a CPU-only build without nvcc: on a GPU machine that is an error.
$py -c "import torch, fastvideo_offload
assert torch._C._dispatch_has_kernel_for_dispatch_key('fastvideo_offload::pack', 'CUDA'), 'built without CUDA'" || exit 1
