"""Timing, memory and copy-rate measurements, on a GPU with CUDA events and on a CPU with
the wall clock."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from .. import _ops, api
from ..planner import spread
from .modes import Mode, block_sizes, host_bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Seconds `fn` takes on the device (CUDA events) or the host, and its result."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
        return start.elapsed_time(end) / 1e3, result
    begin = time.perf_counter()
    result = fn()
    return time.perf_counter() - begin, result


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_mode(
    mode: Mode,
    model: nn.Module,
    make_inputs: Callable[[int], tuple],
    device: torch.device,
    warmup: int,
    steps: int,
    on_step: Callable[[], None],
) -> tuple[dict, torch.Tensor]:
    """Readies `model` (in host memory) the mode's way, runs `warmup + steps` denoising steps (one
    forward each) and measures the timed ones."""
    sizes = block_sizes(model)  # before enable: it swaps the parameters' data
    pinned_before = _pinned_host_bytes(device)
    free_memory(device)
    setup_s, budget = timed(lambda: mode.prepare(model, device), device)
    if device.type == "cuda":
        # After preparing: the peak is what running needs, not what moving the model there took.
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode():
        for step in range(warmup + steps):
            if step == warmup:
                stats_before = _engine_stats(model)
            seconds, output = timed(lambda: model(*make_inputs(step)), device)
            if step >= warmup:
                times.append(seconds)
            on_step()
    stats_after = _engine_stats(model)
    result = {
        "setup_s": setup_s,
        "step_ms": [t * 1e3 for t in times],
        "median_ms": statistics.median(times) * 1e3,
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "host_bytes": host_bytes(model),
        "pinned_by_torch_bytes": _pinned_host_bytes(device) - pinned_before if device.type == "cuda" else None,
    }
    if stats_after is not None:
        copied = stats_after["h2d_bytes"] - stats_before["h2d_bytes"]
        result["h2d_bytes_per_step"] = copied / steps
        result["h2d_GBps_per_step"] = copied / steps / (result["median_ms"] / 1e3) / 1e9
        result["engine"] = stats_after
        result["layout"] = layout(sizes, stats_after)
    if budget is not None:
        result["device_budget"] = budget
    return result, output.float().cpu()


def layout(sizes: list[int], stats: dict) -> dict:
    """Which blocks the engine keeps resident and which it streams, and what a step copies. The
    planner spreads the streamed blocks through the order (planner.spread), so their count names
    them; a model without a budget streams every block."""
    streamed = spread(len(sizes), stats["streamed_blocks"])
    return {
        "resident": [i for i in range(len(sizes)) if i not in streamed],
        "streamed": streamed,
        "streamed_bytes": sum(sizes[i] for i in streamed),
        # The last timed step's copies: resident blocks were copied once, in the warm-up.
        "copied_per_step": stats["forward_h2d_bytes"],
    }


def _engine_stats(model: nn.Module) -> dict | None:
    handle = api.handle_of(model)
    return handle.stats() if handle is not None else None


def _pinned_host_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)


def proc_bytes(field: str, pid: int | str = "self", table: str = "status") -> int:
    """A kB field of /proc/PID/status (VmRSS:, VmHWM:) or /proc/PID/smaps_rollup (Pss:), in bytes."""
    with open(f"/proc/{pid}/{table}") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def reset_peak_rss() -> None:
    """Sets this process's VmHWM to its current RSS, so that the next peak is what follows."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def copy_ceiling(device: torch.device, nbytes: int = 1 << 30) -> float:
    """GB/s of one large host-to-device copy from pinned memory (a memcpy on the CPU)."""
    if device.type == "cuda":
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    else:
        nbytes = min(nbytes, 256 << 20)
        host = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(host)
    best = min(timed(lambda: dst.copy_(host, non_blocking=True), device)[0] for _ in range(3))
    return nbytes / best / 1e9


def pack_throughput(params: list[torch.Tensor], threads: int) -> float:
    """GB/s of packing a block's parameters into its host buffer with `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        offsets, nbytes = _ops.layout(params)
        _ops.pack(params, offsets, nbytes, False)  # first touch of the pages
        best = min(timed(lambda: _ops.pack(params, offsets, nbytes, False), torch.device("cpu"))[0] for _ in range(5))
    finally:
        torch.set_num_threads(before)
    return nbytes / best / 1e9


def staging_throughput(threads: int, block_bytes: int = 32 << 20, blocks: int = 4, steps: int = 4) -> float:
    """GB/s through the staging ring with `threads` host threads, on the synchronous CPU device:
    pageable blocks entered and left in turn with no compute, so each byte is copied twice
    (pageable -> staging buffer by the threads, staging buffer -> slot by the upload), the two
    overlapped. Compare with copy_ceiling(cpu), one memcpy."""
    counts, seconds = staged_steps(threads, block_bytes, blocks, steps)
    return counts["staged_bytes"] / seconds / 1e9


STAGING_COUNTS = ("staged_bytes", "stagings", "uploads")


def staged_steps(threads: int, block_bytes: int, blocks: int, steps: int) -> tuple[dict[str, int], float]:
    """What staging_throughput times: how much the engine staged and uploaded (STAGING_COUNTS) in
    `steps` steps after a first one, and the seconds they took."""
    engine = _ops.engine_create(torch.device("cpu"), 1, threads)
    try:
        keep = []
        for _ in range(blocks):
            host = _ops.alloc_host(block_bytes, False)
            host.fill_(1)  # the pages exist before they are timed
            param = torch.empty(block_bytes, dtype=torch.uint8)
            _ops.engine_add_block(engine, host, [param], [0], True)
            keep.append((host, param))

        def step():
            for b in range(blocks):
                _ops.engine_enter(engine, b)
                _ops.engine_exit(engine, b)

        step()  # allocates the slots and staging buffers
        before = _ops.engine_stats(engine)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        elapsed = time.perf_counter() - start
        after = _ops.engine_stats(engine)
        return {k: after[k] - before[k] for k in STAGING_COUNTS}, elapsed
    finally:
        _ops.engine_destroy(engine)


#: The profiler event that marks a step's start on the host, to put the GPU's events on the host's clock.
STEP_MARK = "fastvideo_offload step"


def engine_timeline(model: nn.Module, inputs: tuple, device: torch.device) -> dict[str, list]:
    """One step of a model offloaded by this engine, in ms from the step's start: "copy" and
    "compute", [start, length] per block; "staging", [start, length, thread, block] per piece a
    staging thread copied into the pinned ring (none when every block is pinned), from the
    engine's trace, which shares the host clock (CLOCK_MONOTONIC) with the marks here. Pieces
    copied ahead for the next step end after the step."""
    handle = api.handle_of(model)
    handle.trace_staging(True)
    try:
        handle.staging_trace()  # what earlier steps staged
        lanes, start_ns = _cuda_lanes(model, inputs, device) if device.type == "cuda" else _cpu_lanes(model, inputs)
        trace = handle.staging_trace().tolist()
    finally:
        handle.trace_staging(False)
    lanes["staging"] = [[(begin - start_ns) / 1e6, (end - begin) / 1e6, thread, block]
                        for block, thread, begin, end in trace]
    return lanes


def _cuda_lanes(model: nn.Module, inputs: tuple, device: torch.device) -> tuple[dict[str, list], int]:
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function(STEP_MARK):
            start_ns = time.monotonic_ns()
            model(*inputs)
        sync(device)
    events = prof.events()
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    # The mark may also show on the GPU's timeline (an annotation, not work).
    kernels = [e for e in events if e.device_type == cuda and e.name != STEP_MARK]
    marks = [e.time_range.start for e in events if e.name == STEP_MARK and e.device_type == cpu]
    if not marks and not kernels:
        return {"copy": [], "compute": []}, start_ns
    # Without the host mark the staging lane cannot be placed exactly: the first GPU event stands in.
    t0 = marks[0] if marks else min(e.time_range.start for e in kernels)

    def span(e):
        return [(e.time_range.start - t0) / 1e3, (e.time_range.end - e.time_range.start) / 1e3]

    return {
        "copy": [span(e) for e in kernels if "HtoD" in e.name],
        "compute": [span(e) for e in kernels if "Memcpy" not in e.name and "Memset" not in e.name],
    }, start_ns


def _cpu_lanes(model: nn.Module, inputs: tuple) -> tuple[dict[str, list], int]:
    # On the CPU the copies run inside the pre-hook: time it from just before to just after.
    marks: dict[str, list] = {"copy": [], "compute": []}
    now = {}

    def ms(ns: int) -> float:
        return (ns - now["start"]) / 1e6

    def before_enter(module, args):
        now["enter"] = time.monotonic_ns()

    def after_enter(module, args):
        now["run"] = time.monotonic_ns()
        marks["copy"].append([ms(now["enter"]), (now["run"] - now["enter"]) / 1e6])

    def after_run(module, args, output):
        marks["compute"].append([ms(now["run"]), (time.monotonic_ns() - now["run"]) / 1e6])

    handles = []
    for path in api.handle_of(model).block_paths:
        for block in model.get_submodule(path):
            handles.append(block.register_forward_pre_hook(before_enter, prepend=True))
            handles.append(block.register_forward_pre_hook(after_enter))
            handles.append(block.register_forward_hook(after_run, prepend=True))
    try:
        now["start"] = time.monotonic_ns()
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return marks, now["start"]
