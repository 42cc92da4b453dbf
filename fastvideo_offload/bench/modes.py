"""The ways of running one model that the benchmark puts side by side.

Every mode starts from the same model in host memory, built once per scenario, and leaves it
ready to run on the device. This engine's modes take that model itself (its host tensors become
the host store: a second reference to them would be counted as memory offloading could not free)
and hand it back to host memory afterwards (`release`); the others get a view of it (`view`), new
parameter objects over the same host tensors, which they move or hook as they like. Peers'
offloaders are used when their packages are installed, set up as their documentation recommends
for speed.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import api
from ..planner import plan
from ..store import BlockStore

GiB = 2**30
#: This engine streaming every block: what the budget rows are measured against besides resident.
STREAM_ALL = "ours p1"
#: The shares of the blocks that the CPU's budget rows keep resident, at most (see share_budget).
CPU_BUDGET_SHARES = (0.25, 0.5, 0.75)
#: A 24 GB card: 20 GiB for the model, the rest for the CUDA context and other processes.
CARD_24GB_BUDGET = 20 * GiB


@dataclass(frozen=True)
class Mode:
    name: str
    #: readies the model; returns the device budget it gave enable, if any
    prepare: Callable[[nn.Module, torch.device], int | str | None]
    #: why this mode cannot run here, or None
    unavailable: Callable[[torch.device], str | None] = lambda device: None
    #: for a mode that takes the scenario's model itself: puts it back in host memory as it was
    release: Callable[[nn.Module], None] | None = None


def _needs(package: str, cuda: bool = False):
    def check(device: torch.device) -> str | None:
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed"
        if cuda and device.type != "cuda":
            return f"{package}'s offload needs a CUDA device"
        return None

    return check


def view(model: nn.Module) -> nn.Module:
    """`model`'s modules again, with new parameter and buffer objects over the same host tensors:
    moving or swapping them (`.to(device)`, a peer's hooks) leaves `model` as it was, and no byte is
    copied. Nothing may write into them in place (a forward in inference mode does not)."""
    memo = {}
    for t in (*model.parameters(), *model.buffers()):
        detached = t.detach()
        memo[id(t)] = nn.Parameter(detached, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else detached
    return copy.deepcopy(model, memo)


def _give_back(model: nn.Module) -> None:
    """After one of this engine's modes: the blocks' weights from the host store into host memory
    (bit-exact, the store freed), the other weights and buffers back from the device."""
    handle = api.handle_of(model)
    if handle is not None:
        handle.disable(device="cpu")
    model.cpu()


def _resident(model, device):
    model.to(device)


def _ours(prefetch: int):
    def prepare(model, device):
        api.enable(model, device=device, prefetch=prefetch)

    return prepare


#: Read by the engine when it is created: copies run on a worker thread, like a GPU's copy engine.
ASYNC_CPU_ENV = {"FASTVIDEO_OFFLOAD_CPU_TRANSFER": "async", "FASTVIDEO_OFFLOAD_ASYNC_DELAY_US": "0"}


def _ours_async(prefetch: int):
    def prepare(model, device):
        # Only around enable, so no other mode's engine gets it; no injected delays, so the row
        # measures copies overlapping compute, not the test suite's random lags.
        saved = {name: os.environ.get(name) for name in ASYNC_CPU_ENV}
        os.environ.update(ASYNC_CPU_ENV)
        try:
            api.enable(model, device=device, prefetch=prefetch)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    return prepare


def block_sizes(model: nn.Module) -> list[int]:
    """Each block's bytes as the engine stores it, in execution order (the bench's models keep
    their blocks in `model.blocks`)."""
    return [BlockStore.nbytes(list(block.parameters())) for block in model.blocks]


def share_budget(model: nn.Module, share: float, slots: int) -> int:
    """The smallest device budget under which the planner keeps `share` of the blocks resident, or
    the most it can below that: a block stays resident only where its bytes do not also pay for
    the ring, so with 8 blocks and 2 slots 6 resident cost what all 8 do, and 75% keeps 5. On a
    CPU no activations are measured, so the budget is the weights outside the blocks plus the plan's."""
    sizes = block_sizes(model)
    staying = sum(t.nbytes for t in (*model.parameters(), *model.buffers())) - sum(sizes)
    for keep in range(int(share * len(sizes)), -1, -1):
        blocks = _smallest_budget(sizes, slots, keep)
        if len(plan(sizes, blocks, slots).resident) == keep:
            return staying + blocks
    raise AssertionError("keeping no block resident always has a plan")


def _smallest_budget(sizes: list[int], slots: int, keep: int) -> int:
    # Residency only grows with the budget, so a bisection finds where it reaches `keep`.
    low, high = 0, sum(sizes) + slots * max(sizes)
    while low < high:
        middle = (low + high) // 2
        try:
            kept = len(plan(sizes, middle, slots).resident)
        except ValueError:  # not even the ring fits
            kept = -1
        low, high = (low, middle) if kept >= keep else (middle + 1, high)
    return low


def _ours_budget(budget: Callable[[nn.Module, int], int | str], prefetch: int = 1):
    def prepare(model, device):
        chosen = budget(model, 1 + prefetch)
        api.enable(model, device=device, prefetch=prefetch, device_budget=chosen)
        return chosen

    return prepare


#: Blocks pinned in the staging row; the others stream through the pinned staging ring.
PINNED_BLOCKS = 3
STAGED = f"ours pin {PINNED_BLOCKS} blocks"


def _ours_pinned(blocks: int, prefetch: int = 1):
    def prepare(model, device):
        block = BlockStore.nbytes(list(model.blocks[0].parameters()))
        api.enable(model, device=device, prefetch=prefetch, host_pin_budget=blocks * block)

    return prepare


def _gpu_only(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "a GPU's budget row; on a CPU the budget rows keep shares of the blocks"
    return None


def _cpu_budget(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "a CPU's budget row; on a GPU the budget rows are the free memory and a 24 GB card"
    return None


def budget_modes(device: torch.device) -> list[str]:
    """The budget rows that run on this kind of device."""
    return [m.name for m in all_modes() if m.name.startswith("ours budget") and m.unavailable(device) is None]


def _cpu_only(device: torch.device) -> str | None:
    if device.type != "cpu":
        return "the asynchronous transfer is the CPU's stand-in for a copy engine; this device has one"
    return None


def _fastvideo(model, device):
    from fastvideo.hooks.layerwise_offload import enable_layerwise_offload

    # As FastVideo's loader does: the whole DiT on the GPU, then offloaded; enable_layerwise_offload
    # keeps a pinned host copy of every block's weights and prefetches on its own stream.
    model.to(device)
    enable_layerwise_offload(model)


def _diffusers(model, device):
    from diffusers.hooks import apply_group_offloading

    # Set for speed as diffusers' docs advise: a stream overlaps copies with compute (CUDA only),
    # record_stream trades a little memory for speed, copies are non-blocking (the stream implies
    # it), and low_cpu_mem_usage stays off: on, it pins on every onload instead of once here,
    # which the docs warn can undo the stream's gain.
    stream = device.type == "cuda"
    apply_group_offloading(
        model,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        non_blocking=True,
        use_stream=stream,
        record_stream=stream,
        low_cpu_mem_usage=False,
    )


def _accelerate(model, device):
    from accelerate import cpu_offload

    # As documented: each submodule's weights stay on the CPU and move to the execution device
    # for its forward; there is no speed option to set.
    cpu_offload(model, execution_device=device)


def all_modes() -> list[Mode]:
    return [
        Mode("resident", _resident),
        Mode("ours p1", _ours(1), release=_give_back),
        Mode("ours p2", _ours(2), release=_give_back),
        Mode("ours p1 async", _ours_async(1), _cpu_only, _give_back),
        *(Mode(f"ours budget {share:.0%}", _ours_budget(lambda model, slots, s=share: share_budget(model, s, slots)),
               _cpu_budget, _give_back) for share in CPU_BUDGET_SHARES),
        Mode(STAGED, _ours_pinned(PINNED_BLOCKS), release=_give_back),
        Mode("ours budget auto", _ours_budget(lambda model, slots: "auto"), _gpu_only, _give_back),
        Mode("ours budget 24 GB card", _ours_budget(lambda model, slots: CARD_24GB_BUDGET), _gpu_only, _give_back),
        Mode("fastvideo", _fastvideo, _needs("fastvideo", cuda=True)),
        Mode("diffusers group", _diffusers, _needs("diffusers")),
        Mode("accelerate", _accelerate, _needs("accelerate")),
    ]


def host_bytes(model: nn.Module) -> int | None:
    """Host bytes our engine keeps (exact), or None for other modes."""
    handle = api.handle_of(model)
    return handle.stats()["host_bytes"] if handle is not None else None
