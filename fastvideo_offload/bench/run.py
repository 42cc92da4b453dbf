"""`python -m fastvideo_offload bench`: every mode on the built-in Wan-shaped DiT, in one process."""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from .. import api
from ..config import resolve_device
from . import load, measure, node, overlap, report, targets, training
from .model import CPU_SMALL, WAN_14B, IdleBlocks, WanShape, build, inputs, weight_bytes
from .modes import STAGED, STREAM_ALL, Mode, all_modes, view

#: Many small Wan blocks with idle forwards: what is left of a step is the offloader's hooks.
HOOK_SHAPE = WanShape(dim=16, heads=1, ffn=16, layers=64)
HOOK_STEPS = 200
#: The reference every mode is measured against; this engine's modes are it and the "ours" rows.
RESIDENT = "resident"

logger = logging.getLogger("fastvideo_offload.bench")

SECTIONS = ("main", "short_clip", "wan22", "hooks", "training", "pack_GBps", "staging_GBps", "load", "node")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastvideo_offload bench", description=__doc__)
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when there is one)")
    p.add_argument("--layers", type=int, default=None, help="blocks in the model (default: 40 on a GPU, 8 on a CPU)")
    p.add_argument("--frames", type=int, default=None, help="video frames (default: 81 on a GPU, 9 on a CPU)")
    p.add_argument("--height", type=int, default=None, help="video height (default: 480 on a GPU, 128 on a CPU)")
    p.add_argument("--width", type=int, default=None, help="video width (default: 832 on a GPU, 128 on a CPU)")
    p.add_argument("--short-frames", type=int, default=None,
                   help="frames of the short clip, where copies dominate (default: 17 on a GPU, 1 on a CPU)")
    p.add_argument("--steps", type=int, default=5, help="timed denoising steps per mode (one forward each)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    # argparse formats help with %: "ours budget 25%" must not be read as a conversion.
    p.add_argument("--modes", default=None,
                   help="comma-separated subset of: " + ", ".join(m.name for m in all_modes()).replace("%", "%%"))
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no mode or section after this many seconds; what is left is reported as skipped")
    p.add_argument("--sections", default=None,
                   help="comma-separated subset of: " + ", ".join(SECTIONS) + " (default: all)")
    p.add_argument("--node-ranks", default=",".join(map(str, node.RANKS)), metavar="N,N,...",
                   help="rank counts of the node section (default: %(default)s)")
    p.add_argument("--json", dest="json_path", default=None, help="write every number here")
    p.add_argument("--table", dest="table_path", default=None,
                   help="write the printed table and the targets' verdicts here (after every mode, like --json)")
    p.add_argument("--plot", dest="plot_path", default=None, help="write a PNG here")
    args = p.parse_args(argv)
    if args.steps < 2 or args.warmup < 1:
        p.error("--steps must be >= 2 and --warmup >= 1")
    unknown = set(args.sections.split(",")) - set(SECTIONS) if args.sections else set()
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def machine(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


class Bench:
    """What every section shares: the arguments, the results so far (judged and written to
    --json and --table after each mode and section, so a run cut off keeps what it measured
    and the verdicts on it), the resident outputs that the other modes must match, the progress
    bar and the time limit."""

    def __init__(self, args: argparse.Namespace, results: dict, bar):
        self.args, self.results, self.bar = args, results, bar
        self.references: dict[str, torch.Tensor] = {}
        self.deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
        self.wanted = None if args.sections is None else set(args.sections.split(","))

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def save(self) -> None:
        self.results["targets"] = targets.judge(self.results)
        if self.args.json_path:
            report.write_json(self.results, self.args.json_path)
        if self.args.table_path:
            report.write_table(self.results, self.args.table_path)

    def section(self, name: str, measure_it, by_mode: bool = False) -> None:
        """Runs one section, unless the time limit has passed (a section of modes runs and skips
        mode by mode instead), or --sections leaves it out (the table then says it did not run). One
        failing section must not cost the numbers of the others."""
        if self.wanted is not None and name not in self.wanted:
            return
        if self.out_of_time() and not by_mode:
            self.results.setdefault(name, {})["failed"] = "not run: time limit"
        else:
            try:
                self.results[name] = measure_it()
            except Exception as exc:  # noqa: BLE001
                logger.exception("bench: %s failed", name)
                self.results.setdefault(name, {})["failed"] = f"{type(exc).__name__}: {exc}"[:500]
        self.save()


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    base = WAN_14B if gpu else CPU_SMALL
    shape = replace(base, layers=args.layers or base.layers)
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    frames = args.frames or (81 if gpu else 9)
    height, width = args.height or (480 if gpu else 128), args.width or (832 if gpu else 128)
    short_frames = args.short_frames or (17 if gpu else 1)
    wanted = set(args.modes.split(",")) if args.modes else None
    modes = [m for m in all_modes() if wanted is None or m.name in wanted]
    # Ours and the resident reference first: the targets need them, and peers' offloaders
    # (accelerate's above all) are slow enough that a time limit should cut them, not ours.
    # The resident reference runs again after each pass of offloaded modes, so that a machine
    # whose speed drifts shows it (the spread) instead of passing it off as overhead.
    own = [m for m in modes if m.name == RESIDENT or m.name.startswith("ours")]
    peers = [m for m in modes if m not in own]
    resident = next((m for m in own if m.name == RESIDENT), None)
    tokens, short_tokens = shape.tokens(frames, height, width), shape.tokens(short_frames, height, width)

    results: dict = {
        "machine": machine(device),
        "shape": shape.as_dict(),
        "dtype": str(dtype).removeprefix("torch."),
        "video": {"frames": frames, "height": height, "width": width, "tokens": tokens},
        "weight_bytes": weight_bytes(shape, dtype),
        "time_limit_s": args.time_limit,
        "complete": False,
    }
    results["copy_ceiling_GBps"] = measure.copy_ceiling(device)

    per_mode = args.warmup + args.steps
    reruns = 3 if resident else 0  # after ours in main and the short clip, after the peers
    # main, short clip, Wan2.2 (+1 warm-up), hooks
    total = (len(modes) + len(own) + reruns + 2) * per_mode + 1
    with tqdm(total=total, desc="bench", unit="step", disable=None) as bar:
        bench = Bench(args, results, bar)
        bench.section("main", lambda: scenario(bench, "main", shape, dtype, device, own, tokens, timeline=True,
                                               rerun=resident, after="ours"), by_mode=True)
        bench.section("short_clip", lambda: scenario(bench, "short_clip", shape, dtype, device, own, short_tokens,
                                                     rerun=resident, after="ours", frames=short_frames),
                      by_mode=True)
        bench.section("wan22", lambda: wan22(bench, shape, dtype, device, short_tokens))
        if peers:
            bench.section("main", lambda: scenario(bench, "main", shape, dtype, device, peers, tokens,
                                                   rerun=resident, after="peers"), by_mode=True)
        bench.section("hooks", lambda: hook_overhead(bench, device, dtype, modes))
        bench.section("training", lambda: training.compare(shape, dtype, device, short_tokens, args.steps, args.warmup))
    params = [p.detach() for p in build(CPU_SMALL, torch.float32).blocks[0].parameters()]
    bench.section("pack_GBps", lambda: {
        "threads_1": measure.pack_throughput(params, 1),
        f"threads_{torch.get_num_threads()}": measure.pack_throughput(params, torch.get_num_threads()),
    })
    # Pageable blocks through the pinned staging ring, no compute: against one memcpy, each byte
    # is copied twice (into the ring by the host threads, from it by the upload).
    bench.section("staging_GBps", lambda: {
        "memcpy": measure.copy_ceiling(torch.device("cpu")),
        **{f"threads_{n}": measure.staging_throughput(n) for n in (1, 2, 4)},
    })
    # Each way and each rank count in processes of their own, after this process's measurements.
    bench.section("load", lambda: load.compare(_factory(shape, dtype, device), shape, dtype, device, bench.out_of_time))
    ranks = tuple(int(n) for n in args.node_ranks.split(","))
    bench.section("node", lambda: node.compare(ranks, bench.out_of_time))
    results["complete"] = True
    bench.save()
    return results


def _factory(shape: WanShape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    def make():
        measure.free_memory(device)
        torch.manual_seed(seed)
        if device.type == "cuda":
            # Random init is fast on the GPU; every mode then starts from host memory.
            return build(shape, dtype, device).cpu()
        return build(shape, dtype)

    return make


def _inputs(shape: WanShape, tokens: int, dtype: torch.dtype, device: torch.device):
    latents, timestep, context = inputs(shape, tokens, dtype, device)

    def make(step: int):
        return latents, timestep - 10 * step, context

    return make


def scenario(bench: Bench, name: str, shape, dtype, device, modes: list[Mode], tokens: int,
             timeline: bool = False, rerun: Mode | None = None, after: str = "", **about) -> dict:
    """Runs `modes` one after another on one model, built here once, adding a row each to the
    section `name` (a later call adds more rows to the same section); then, when an offloaded
    mode that can run here was among them, `rerun` (the resident reference) again as the row
    "resident after `after`". A mode of this engine takes the model and gives it back to host
    memory (Mode.release); the others run on a view of it (modes.view). Every row's output is
    compared with the resident one's, so a model that came back changed shows as not bit-identical."""
    section = bench.results.get(name, {})
    if "modes" not in section:  # a first pass's failure, if any, stays on record
        section = bench.results[name] = {**section, "tokens": tokens, **about, "modes": {}}
    rows = section["modes"]
    make_model = _factory(shape, dtype, device)
    make_inputs = _inputs(shape, tokens, dtype, device)
    steps = bench.args.warmup + bench.args.steps
    runs = [(mode.name, mode) for mode in modes]
    if rerun is not None and any(m.name != RESIDENT and m.unavailable(device) is None for m in modes):
        runs.append((f"{RESIDENT} after {after}", rerun))
    host = None
    for row_name, mode in runs:
        reason = "time limit" if bench.out_of_time() else mode.unavailable(device)
        if reason:
            rows[row_name] = {"skipped": reason}
            bench.bar.update(steps)
            continue
        if host is None:
            host = make_model()
        model = host if mode.release else view(host)
        try:
            row, output = measure.run_mode(
                mode, model, make_inputs, device, bench.args.warmup, bench.args.steps,
                lambda: bench.bar.update(1),
            )
            if row_name == RESIDENT:
                bench.references[name] = output
            reference = bench.references.get(name)
            row["bit_identical"] = None if reference is None else bool(torch.equal(output, reference))
            if timeline and row_name in (STREAM_ALL, STAGED):
                _timeline(row, row_name, model, make_inputs, device)
            rows[row_name] = row
        except torch.OutOfMemoryError:
            rows[row_name] = {"skipped": "out of device memory"}
        except Exception as exc:  # noqa: BLE001  (a peer's offloader failing must not stop ours)
            logger.exception("bench: mode %s failed", row_name)
            rows[row_name] = {"skipped": f"failed: {type(exc).__name__}: {exc}"[:300]}
        finally:
            del model
            if mode.release:
                host = _released(mode, host)
            measure.free_memory(device)
        _overheads(section)
        bench.save()
    return section


def _released(mode: Mode, host):
    """The scenario's model back in host memory after `mode` took it, or None (built again for
    the next mode) if it could not be given back."""
    try:
        mode.release(host)
        return host
    except Exception:  # noqa: BLE001
        logger.exception("bench: giving the model back after %s failed; the next mode builds it again", mode.name)
        return None


def _timeline(row: dict, row_name: str, model, make_inputs, device) -> None:
    try:
        with torch.inference_mode():
            row["timeline"] = measure.engine_timeline(model, make_inputs(0), device)
    except Exception as exc:  # noqa: BLE001  (a picture, not a measurement: the row stands without it)
        logger.exception("bench: the timeline of %s failed", row_name)
        row["timeline_failed"] = f"{type(exc).__name__}: {exc}"[:300]
    else:
        share = overlap.staging_overlap(row["timeline"])
        if share is not None:
            row["staging_overlap"] = share


def _overheads(section: dict) -> None:
    """Every row's overhead against the mean of the resident runs (before and after the
    offloaded modes), and how far those runs are apart: (slowest - fastest) / fastest; and each
    budget row's time against this engine streaming every block."""
    rows = section["modes"]
    runs = {n: r["median_ms"] for n, r in rows.items() if n.startswith(RESIDENT) and "median_ms" in r}
    if not runs:
        return
    reference = statistics.mean(runs.values())
    section["resident"] = {
        "runs_ms": runs,
        "reference": f"mean of {len(runs)} resident run" + ("s" if len(runs) > 1 else ""),
        "reference_ms": reference,
        "spread_pct": (max(runs.values()) / min(runs.values()) - 1) * 100 if len(runs) > 1 else None,
    }
    for row in rows.values():
        if "median_ms" in row:
            row["overhead_pct"] = (row["median_ms"] / reference - 1) * 100
    stream_all = rows.get(STREAM_ALL, {}).get("median_ms")
    for row in rows.values():
        if stream_all and "device_budget" in row and "median_ms" in row:
            row["vs_stream_all_pct"] = (row["median_ms"] / stream_all - 1) * 100


def wan22(bench: Bench, shape, dtype, device, tokens: int) -> dict:
    """Two experts, switched after half the steps; enabled in one group, so the idle expert
    gives its device slots back when the other starts (inside the timed switch step)."""
    steps = bench.args.warmup + bench.args.steps
    pair = replace(shape, layers=min(shape.layers, 20))
    make_inputs = _inputs(pair, tokens, dtype, device)
    experts = [_factory(pair, dtype, device, seed)() for seed in (1, 2)]
    handles = [api.enable(m, device=device, prefetch=1, group="bench-wan22") for m in experts]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    switch = steps // 2
    times = []
    with torch.inference_mode():
        for step in range(-1, steps):  # step -1 warms the first expert up
            expert = experts[0 if step < switch else 1]
            times.append(measure.timed(lambda: expert(*make_inputs(step)), device)[0] * 1e3)
            bench.bar.update(1)
    steady = statistics.median(times[switch + 2 :]) if len(times) > switch + 2 else statistics.median(times[1:])
    slot_bytes = handles[1].stats()["slot_bytes"]
    result = {
        "layers": pair.layers,
        "tokens": tokens,
        "step_ms": times[1:],
        "switch_step": switch,
        "switch_stall_ms": times[switch + 1] - steady,
        "one_block_copy_ms": slot_bytes / (bench.results["copy_ceiling_GBps"] * 1e9) * 1e3,
        "peak_device_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "idle_expert_device_bytes": handles[0].stats()["device_bytes"],
    }
    del handles, experts  # not disable(): that would copy both experts back to the device first
    measure.free_memory(device)
    return result


def hook_overhead(bench: Bench, device, dtype, modes: list[Mode]) -> dict:
    """Host time each offloader adds per block per step, on Wan-shaped blocks whose forward
    does no work. Counted as this thread's CPU time on one intra-op thread, so that time the
    machine spends on other work does not count."""
    x = torch.zeros(1, 4, HOOK_SHAPE.dim, dtype=dtype, device=device)
    per_mode = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for mode in modes:
            reason = mode.unavailable(device)
            if reason:
                per_mode[mode.name] = {"skipped": reason}
                continue
            measure.free_memory(device)
            model = IdleBlocks(HOOK_SHAPE).to(dtype).requires_grad_(False)
            mode.prepare(model, device)
            samples = []
            with torch.inference_mode():
                for step in range(bench.args.warmup + HOOK_STEPS):
                    begin = time.thread_time()
                    model(x)
                    # Before the synchronize: its spin-wait would count the device's work.
                    elapsed = time.thread_time() - begin
                    measure.sync(device)
                    if step >= bench.args.warmup:
                        samples.append(elapsed)
            per_mode[mode.name] = {"cpu_ms": statistics.median(samples) * 1e3}
            del model
    finally:
        torch.set_num_threads(threads)
    bench.bar.update(bench.args.warmup + bench.args.steps)
    resident = per_mode.get("resident", {}).get("cpu_ms")
    for row in per_mode.values():
        if resident and "cpu_ms" in row:
            row["us_per_block"] = (row["cpu_ms"] - resident) * 1e3 / HOOK_SHAPE.layers
    return {"layers": HOOK_SHAPE.layers, "modes": per_mode}


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = run(args)
    print(report.table(results))
    for path in (args.json_path, args.table_path):
        if path:
            print(f"wrote {path}")
    if args.plot_path:
        report.plot(results, args.plot_path)
        print(f"wrote {args.plot_path}")
    return results
