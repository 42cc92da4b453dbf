"""The offloaded paths against the resident model, in one short run (scripts/gpu_check.sh, part 3).

`python -m fastvideo_offload.bench.correctness [--device D] [--time-limit S]` prints one line per
case, `EXACT` or `MISMATCH max|diff| <value>` (or `ERROR <exception>`): prefetch 0, 1 and 2;
blocks staged through the pinned ring from pageable memory (a pin budget of two blocks) and from
a checkpoint's mapped pages (`checkpoint=` with `host_pin_budget=0`); a device budget that keeps
every block resident and one that keeps half. The budget cases also print the bytes each step
copied (`stats()["forward_h2d_bytes"]`), which after the first step must be their streamed
blocks' bytes.

Every case runs with lagging compute: on CUDA each block starts with a sleep kernel, so the
compute stream falls far behind the host while the copies for later blocks are queued into the
slots; a copy not ordered after the compute that last read its slot, or a block run before its
copy landed, changes the output. The reference is the same model resident on the same device,
run the same way (the same lag, the same inputs, one forward after another). On the CPU (the
dry run; with FASTVIDEO_OFFLOAD_CPU_TRANSFER=async copies run on a thread, delayed) there is no
stream to lag. Exits 1 if a case is not exact or a budget case copies other bytes than it streams.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

from .. import api
from ..config import resolve_device
from ..store import BlockStore

LAYERS = 8
FORWARDS = 4
NAME_WIDTH = 50
#: About a millisecond on an H100 or H200 (torch.cuda._sleep spins for clock cycles).
LAG_CYCLES = 2_000_000


class LaggingBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        if x.is_cuda:
            torch.cuda._sleep(LAG_CYCLES)  # the compute stream stays busy while the copies queue up
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


class LaggingModel(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.blocks = nn.ModuleList(LaggingBlock(dim) for _ in range(LAYERS))
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(dim: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> LaggingModel:
    with torch.device(device):
        return LaggingModel(dim).to(dtype).eval().requires_grad_(False)


def block_bytes(model: nn.Module) -> int:
    return BlockStore.nbytes(list(model.blocks[0].parameters()))


def staying_bytes(model: nn.Module) -> int:
    """What stays on the device under a budget: the weights and buffers outside the blocks."""
    named = (*model.named_parameters(), *model.named_buffers())
    return sum(t.nbytes for name, t in named if not name.startswith("blocks."))


class Cases:
    """The master model (host memory), its resident reference's outputs, and a model per case."""

    def __init__(self, device: torch.device, dim: int, dtype: torch.dtype, tokens: int, workdir: str):
        self.device, self.dim, self.dtype, self.workdir = device, dim, dtype, workdir
        torch.manual_seed(0)
        self.master = build(dim, dtype, device).cpu()  # random init is fast on a GPU; cases start from host memory
        self.inputs = [0.5 * torch.randn(tokens, dim, dtype=dtype, device=device) for _ in range(FORWARDS)]
        self.block = block_bytes(self.master)
        resident = copy.deepcopy(self.master).to(device)
        self.expected = self.run(resident)
        del resident
        self.checkpoint = None

    def run(self, model: nn.Module, after_each: Callable[[], None] = lambda: None) -> list[torch.Tensor]:
        outputs = []
        with torch.no_grad():
            for x in self.inputs:
                outputs.append(model(x))
                after_each()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return outputs

    def copy(self) -> nn.Module:
        return copy.deepcopy(self.master)

    def from_checkpoint(self) -> nn.Module:
        from safetensors.torch import save_file

        if self.checkpoint is None:
            self.checkpoint = os.path.join(self.workdir, "model.safetensors")
            save_file(self.master.state_dict(), self.checkpoint)
        return build(self.dim, self.dtype, "meta")

    def margin(self) -> int:
        """Room in a budget for the activations CUDA measures (far less than a block here), so
        that the blocks' share holds exactly the residents planned."""
        return self.block // 2 if self.device.type == "cuda" else 0


def check(
    cases: Cases, name: str, enable: Callable[[Cases], tuple[nn.Module, object]], budget: bool = False
) -> list[str]:
    """One case: its verdict line and, for a budget case, its bytes line; the problems it found."""
    begin = time.monotonic()
    try:
        model, handle = enable(cases)
        copied: list[int] = []
        got = cases.run(model, lambda: copied.append(handle.stats()["forward_h2d_bytes"]))
        stats = handle.stats()
    except Exception as exc:  # noqa: BLE001  (one case failing must not hide the others)
        print(f"{name:<{NAME_WIDTH}} ERROR {type(exc).__name__}: {exc}"[:400], flush=True)
        return [name]
    diff = max((g.float() - e.float()).abs().max().item() for g, e in zip(got, cases.expected))
    exact = all(torch.equal(g, e) for g, e in zip(got, cases.expected))
    verdict = "EXACT" if exact else f"MISMATCH max|diff| {diff:.3e}"
    about = f"staged {stats['staged_blocks']}, mapped {stats['mapped_bytes']} B, " if stats["staged_blocks"] else ""
    print(f"{name:<{NAME_WIDTH}} {verdict}  ({about}{time.monotonic() - begin:.1f} s)", flush=True)
    problems = [] if exact else [name]
    if budget:
        # After the first step (which copies the resident blocks once) every step copies exactly
        # the streamed blocks: a re-plan that copies resident blocks again shows here.
        streamed = stats["streamed_blocks"] * cases.block  # the blocks are all one size
        steady = all(c == streamed for c in copied[1:])
        print(f"  bytes copied per step {copied}; resident {stats['resident_blocks']}, streamed "
              f"{stats['streamed_blocks']} blocks = {streamed} B a step after the first: "
              f"{'OK' if steady else 'DIFFERS'}", flush=True)
        if not steady:
            problems.append(f"{name}: bytes")
    return problems


def _offload(**options):
    def enable(cases: Cases):
        model = cases.copy()
        return model, api.enable(model, device=cases.device, **options)

    return enable


def _mapped(prefetch: int):
    def enable(cases: Cases):
        model = cases.from_checkpoint()
        return model, api.enable(model, device=cases.device, prefetch=prefetch, checkpoint=cases.checkpoint,
                                       host_pin_budget=0)

    return enable


def _budget(resident: int, prefetch: int = 1):
    """A budget for the weights outside the blocks, `resident` blocks and the ring of 1 + prefetch
    slots (none when every block is resident), and the activations' margin."""
    def enable(cases: Cases):
        model = cases.copy()
        ring = 0 if resident == LAYERS else 1 + prefetch
        budget = staying_bytes(model) + (resident + ring) * cases.block + cases.margin()
        return model, api.enable(model, device=cases.device, prefetch=prefetch, device_budget=budget)

    return enable


def all_cases() -> list[tuple[str, Callable, bool]]:
    pinned_two = lambda prefetch: lambda cases: _offload(prefetch=prefetch, host_pin_budget=2 * cases.block)(cases)  # noqa: E731
    return [
        *((f"prefetch {p}", _offload(prefetch=p), False) for p in (0, 1, 2)),
        *((f"staged from pageable, 2 of {LAYERS} pinned, prefetch {p}", pinned_two(p), False) for p in (1, 2)),
        *((f"staged from a mapped checkpoint, prefetch {p}", _mapped(p), False) for p in (1, 2)),
        (f"budget: all {LAYERS} blocks resident", _budget(LAYERS), True),
        (f"budget: {LAYERS // 2} of {LAYERS} blocks resident", _budget(LAYERS // 2), True),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastvideo_offload.bench.correctness",
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when there is one)")
    p.add_argument("--time-limit", type=float, default=35.0, metavar="SECONDS",
                   help="start no case after this many seconds (default: %(default)s)")
    args = p.parse_args(argv)
    start = time.monotonic()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    # On a GPU 64 MiB blocks (a copy takes about as long as the lag); on a CPU a few seconds in all.
    dim, dtype, tokens = (2048, torch.float16, 256) if gpu else (64, torch.float32, 16)
    transfer = "" if gpu else f", CPU transfer {os.environ.get('FASTVIDEO_OFFLOAD_CPU_TRANSFER', 'sync')}"
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fvo-correctness-") as workdir:
        cases = Cases(device, dim, dtype, tokens, workdir)
        print(f"correctness on {device}{transfer}: {LAYERS} blocks of {cases.block / 2**20:.2f} MiB ({dtype}), "
              f"{FORWARDS} forwards each, {'a sleep kernel before each block' if gpu else 'no lag on a CPU'}; "
              f"reference: the resident model ({time.monotonic() - start:.1f} s)", flush=True)
        stop = None
        for name, enable, budget in all_cases():
            if stop is None and time.monotonic() - start > args.time_limit:
                stop = "time limit"
            if stop is not None:
                print(f"{name:<{NAME_WIDTH}} NOT RUN ({stop})", flush=True)
                problems.append(name)
                continue
            try:
                problems += check(cases, name, enable, budget)
            except KeyboardInterrupt:  # the part's time limit: what is left is reported, not lost
                stop = "interrupted"
                print(f"{name:<{NAME_WIDTH}} NOT RUN ({stop})", flush=True)
                problems.append(name)
    print(f"correctness: {'all exact' if not problems else 'PROBLEMS: ' + '; '.join(problems)} "
          f"({time.monotonic() - start:.1f} s)", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
