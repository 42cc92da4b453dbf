"""What the GPU machine offers, measured before anything is built (scripts/gpu_check.sh, part 1).

Prints one `name: value` line per fact as soon as it is known, so a probe cut off at its time
limit keeps what it measured: the kernel, the NVIDIA driver, nvcc, `ulimit -l`, pinned
host-to-device GB/s on 1 GiB, the time cudaHostAlloc takes for 4 GiB (and cudaFreeHost to give
it back), cudaHostRegister on a memfd mapping (how the node share pins its pages) and a copy
from it, and one thread's memcpy GB/s. It needs only torch: the CUDA runtime calls go through
ctypes to the libcudart torch has loaded, never through this project's extension, which is not
built yet.

Without a GPU (`--dry-run`, CI) the same code runs at a small size: the runtime calls report the
error they return, and what needs a CUDA tensor says it was skipped.

Usage: python scripts/gpu_probe.py [--dry-run]
"""

from __future__ import annotations

import time

_START = time.monotonic()  # before torch's import, whose time counts against the part's limit

import argparse  # noqa: E402
import ctypes  # noqa: E402
import mmap  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

import torch  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20


def say(name: str, value: str) -> None:
    print(f"{name}: {value}  [{time.monotonic() - _START:.1f} s]", flush=True)


def attempt(name: str, measure) -> None:
    """One line per measurement; a failing one says why and does not stop the others."""
    try:
        say(name, measure())
    except Exception as exc:  # noqa: BLE001  (a probe reports, it does not judge)
        say(name, f"failed: {type(exc).__name__}: {exc}"[:300])


def _run(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, timeout=5).stdout.strip()


def kernel() -> str:
    return f"{platform.release()} ({platform.machine()}), {len(os.sched_getaffinity(0))} CPUs usable"


def driver() -> str:
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip()
    except OSError:
        pass
    if shutil.which("nvidia-smi"):
        return _run("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")
    return "none found (no /proc/driver/nvidia/version, no nvidia-smi)"


def nvcc() -> str:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    candidates = (os.path.join(home, "bin", "nvcc"), shutil.which("nvcc"))
    found = next((p for p in candidates if p and os.path.exists(p)), None)
    if found is None:
        return "not found"
    lines = _run(found, "--version").splitlines()
    return f"{found}: {next((line for line in lines if 'release' in line), lines[-1] if lines else '?')}"


def memlock() -> str:
    def kib(limit: int) -> str:
        return "unlimited" if limit == resource.RLIM_INFINITY else f"{limit // 1024} KiB"

    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return f"{kib(soft)} (hard {kib(hard)})"


def host_memory() -> str:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    text = f"MemTotal {info['MemTotal'] / GiB:.1f} GiB, MemAvailable {info['MemAvailable'] / GiB:.1f} GiB"
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            text += f", cgroup memory.max {f.read().strip()}"
    except OSError:
        pass
    return text


class Runtime:
    """The CUDA runtime torch loaded (found in this process's mappings), called through ctypes."""

    def __init__(self):
        path = next((line.split()[-1] for line in open("/proc/self/maps") if "libcudart" in line), None)
        if path is None:
            raise RuntimeError("torch loaded no libcudart (a CPU-only torch?)")
        self.path = path
        self.lib = ctypes.CDLL(path)
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    def check(self, err: int, what: str) -> None:
        if err != 0:
            raise RuntimeError(f"{what} returned {self.error(err)}")

    def versions(self) -> str:
        runtime, driver_api = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.cudaRuntimeGetVersion(ctypes.byref(runtime)), "cudaRuntimeGetVersion")
        self.check(self.lib.cudaDriverGetVersion(ctypes.byref(driver_api)), "cudaDriverGetVersion")
        return f"runtime {runtime.value}, driver API {driver_api.value} ({os.path.basename(self.path)})"

    def error(self, err: int) -> str:
        return f"{err} ({self.lib.cudaGetErrorString(err).decode()})"

    def host_alloc(self, nbytes: int) -> str:
        ptr = ctypes.c_void_p()
        begin = time.perf_counter()
        self.check(self.lib.cudaHostAlloc(ctypes.byref(ptr), ctypes.c_size_t(nbytes), 0), "cudaHostAlloc")
        alloc = time.perf_counter() - begin
        begin = time.perf_counter()
        self.check(self.lib.cudaFreeHost(ptr), "cudaFreeHost")
        return (f"{alloc:.2f} s ({nbytes / alloc / 1e9:.1f} GB/s); "
                f"cudaFreeHost {time.perf_counter() - begin:.2f} s")


def _best_copy_s(dst: torch.Tensor, src: torch.Tensor, repeats: int = 3) -> float:
    """The fastest of `repeats` copies, timed with CUDA events (on the copy's device) or the clock."""
    best = float("inf")
    for _ in range(repeats):
        if dst.is_cuda or src.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - begin)
    return best


def pinned_copy(nbytes: int) -> str:
    begin = time.perf_counter()
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    pin_s = time.perf_counter() - begin
    host.fill_(1)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    h2d, d2h = _best_copy_s(device, host), _best_copy_s(host, device)
    return (f"H2D {nbytes / h2d / 1e9:.1f} GB/s, D2H {nbytes / d2h / 1e9:.1f} GB/s "
            f"(torch's pin_memory of it: {pin_s:.2f} s)")


def memfd_register(runtime: Runtime, nbytes: int, gpu: bool) -> str:
    """A shared mapping of an anonymous memfd, as the node share maps its store: page-locked in
    place with cudaHostRegister, then copied to the device (from pageable pages if the register
    failed; to host memory without a GPU)."""
    fd = os.memfd_create("fastvideo_offload-probe")
    try:
        os.ftruncate(fd, nbytes)
        mapping = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    host = torch.frombuffer(mapping, dtype=torch.uint8)
    try:
        begin = time.perf_counter()
        host.fill_(1)
        text = f"first touch {nbytes / (time.perf_counter() - begin) / 1e9:.1f} GB/s"
        begin = time.perf_counter()
        err = runtime.lib.cudaHostRegister(ctypes.c_void_p(host.data_ptr()), ctypes.c_size_t(nbytes), 0)
        text += f"; cudaHostRegister {time.perf_counter() - begin:.3f} s -> {runtime.error(err)}"
        try:
            target = torch.empty(nbytes, dtype=torch.uint8, device="cuda" if gpu else "cpu")
            kind = "registered" if err == 0 else "pageable"
            text += f"; copy from it ({kind}) {nbytes / _best_copy_s(target, host) / 1e9:.1f} GB/s"
        finally:
            if err == 0:
                runtime.check(runtime.lib.cudaHostUnregister(ctypes.c_void_p(host.data_ptr())), "cudaHostUnregister")
        return text
    finally:
        del host  # the mapping cannot close while a tensor exports its buffer
        mapping.close()


def memcpy_one_thread(nbytes: int) -> str:
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.zeros(nbytes, dtype=torch.uint8)
    best = float("inf")
    for _ in range(3):
        begin = time.perf_counter()
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)  # libc memcpy, on this thread alone
        best = min(best, time.perf_counter() - begin)
    return f"{nbytes / best / 1e9:.1f} GB/s ({nbytes // MiB} MiB)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="no GPU expected: small sizes (CI)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    small = args.dry_run or not gpu
    copy_bytes, alloc_bytes = (64 * MiB, 256 * MiB) if small else (GiB, 4 * GiB)
    say("kernel", kernel())
    attempt("driver", driver)
    attempt("nvcc", nvcc)
    say("ulimit -l", memlock())
    attempt("host memory", host_memory)
    say("torch", f"{torch.__version__}, CUDA {torch.version.cuda}")
    if gpu:
        props = torch.cuda.get_device_properties(0)
        say("gpu", f"{props.name}, {props.total_memory / GiB:.1f} GiB, sm_{props.major}{props.minor}, "
                   f"{torch.cuda.device_count()} device(s)")
        say("arch", f"{props.major}.{props.minor}")  # gpu_check.sh builds for it alone
    else:
        say("gpu", "none (torch.cuda.is_available() is False): the CUDA measurements below say why they did not run")
    try:
        runtime = Runtime()
    except Exception as exc:  # noqa: BLE001
        say("cudart", f"failed: {exc}")
        runtime = None
    if runtime is not None:
        attempt("cudart", runtime.versions)
    if gpu:
        attempt(f"pinned {copy_bytes // MiB} MiB", lambda: pinned_copy(copy_bytes))
    else:
        say(f"pinned {copy_bytes // MiB} MiB", "skipped: no GPU")
    if runtime is not None:
        attempt(f"cudaHostAlloc {alloc_bytes // MiB} MiB", lambda: runtime.host_alloc(alloc_bytes))
        attempt(f"memfd {copy_bytes // MiB} MiB", lambda: memfd_register(runtime, copy_bytes, gpu))
    attempt("memcpy, one thread", lambda: memcpy_one_thread(copy_bytes))
    say("probe", "done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
