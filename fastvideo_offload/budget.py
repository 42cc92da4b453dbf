"""`enable(..., device_budget=...)`: the blocks that fit stay on the device, the rest stream.

The budget covers everything the model keeps on the device: its non-block weights and buffers,
the resident blocks, the ring of slots for the streamed ones, and (on CUDA) the activations of the
largest forward seen so far. Within it, planner.plan keeps as many blocks resident as fit and
spreads the streamed ones through the execution order: registration order until a forward has
run, then the order the engine saw (lists registered in another order than they run, as
HunyuanVideo's may be, or interleaved, as Wan VACE's), re-planned once when it differs. The slot
budget of the engine is set to the blocks' share, so the bound holds even while prefetching.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import _ops
from .arguments import byte_count, leave_headroom
from .hooks import Hooks
from .planner import Plan, plan

logger = logging.getLogger("fastvideo_offload")

#: device_budget="auto" leaves max(DEVICE_HEADROOM_MIN, DEVICE_HEADROOM_FRACTION of the device's
#: memory) free: for other processes, the CUDA context's growth and allocator fragmentation.
DEVICE_HEADROOM_MIN = 1 << 30
DEVICE_HEADROOM_FRACTION = 0.05


def auto_device_budget(device: torch.device, modules: list[nn.Module]) -> int:
    """device_budget="auto": free device memory plus what `modules` hold there already (memory they
    may use), less the headroom."""
    if device.type != "cuda":
        raise ValueError(f"device_budget='auto' reads free CUDA memory; on {device} give a byte count")
    free, total = torch.cuda.mem_get_info(device)
    tensors = {id(t): t for m in modules for t in [*m.parameters(), *m.buffers()] if t.device == device}
    held = sum(t.untyped_storage().nbytes() for t in tensors.values())
    return leave_headroom(free + held, total, at_least=DEVICE_HEADROOM_MIN, fraction=DEVICE_HEADROOM_FRACTION)


class DeviceBudget:
    """Plans and re-plans residency for one model's engine."""

    def __init__(self, model: nn.Module, device: torch.device, sizes: list[int], slots: int, fixed_bytes: int,
                 budget: int | str):
        """Plans at once, so that a budget that cannot work is refused before enable changes anything."""
        self._engine: int | None = None
        self._device, self._sizes, self._slots = device, sizes, slots
        self._fixed = fixed_bytes  # non-block weights and buffers on the device, and resident copies
        self._order = list(range(len(sizes)))  # the execution order planned in
        self._activations = 0
        self._measuring = False
        self._total = auto_device_budget(device, [model]) if budget == "auto" else budget
        self.plan: Plan = self._plan()
        self._applied: frozenset[int] | None = None  # the resident blocks the engine holds

    def attach(self, model: nn.Module, engine: int, hooks: Hooks) -> None:
        """Applies the plan to the engine that now holds the blocks, and measures every forward
        (hooks into the model's set)."""
        self._engine = engine
        self._apply()
        if self._device.type == "cuda":
            _ops.engine_watch_memory(engine, True)
        hooks.add(model.register_forward_pre_hook(self._before), model.register_forward_hook(self._after))

    @property
    def blocks_budget(self) -> int:
        return self._total - self._fixed - self._activations

    def _plan(self) -> Plan:
        budget = self.blocks_budget
        if budget < 0:
            raise ValueError(
                f"device_budget: {self._total} bytes do not hold what stays on the device ({self._fixed} bytes of "
                f"non-block weights and buffers, {self._activations} bytes of activations)"
            )
        # The planner works on positions in execution order; the engine names blocks.
        order = self._order
        p = plan([self._sizes[b] for b in order], budget, self._slots)
        return Plan(tuple(order[i] for i in p.resident), tuple(order[i] for i in p.streamed), p.device_bytes,
                    p.streamed_bytes)

    def _replan(self) -> None:
        self.plan = self._plan()
        self._apply()

    def _apply(self) -> None:
        new = self.plan
        if frozenset(new.resident) != self._applied:
            # The engine keeps the slots of blocks that stay resident and copies only the new ones.
            _ops.engine_set_resident(self._engine, list(new.resident))
            self._applied = frozenset(new.resident)
        _ops.engine_set_slot_budget(self._engine, self.blocks_budget)
        logger.info(
            "device budget %.1f MiB: %d block(s) resident (%.1f MiB), %d streamed (%.1f MiB copied per step)",
            self._total / 2**20, len(new.resident), (new.device_bytes - self._ring(new)) / 2**20,
            len(new.streamed), new.streamed_bytes / 2**20,
        )

    def _ring(self, p: Plan) -> int:
        return min(self._slots, len(p.streamed)) * max((self._sizes[i] for i in p.streamed), default=0)

    def set_budget(self, budget: int) -> None:
        """A new budget from the next forward on."""
        byte_count("set_device_budget", budget)
        old = self._total
        self._total = budget
        try:
            self._replan()
        except ValueError:
            self._total = old
            raise

    def _before(self, module, args) -> None:
        # Activations are measured on CUDA: the peak of a forward above what it started with. The
        # allocator's peak is the process's, which users and benchmarks read too: it is never reset.
        if self._device.type == "cuda" and not torch.compiler.is_compiling():
            self._start = torch.cuda.memory_allocated(self._device)
            self._peak_before = torch.cuda.max_memory_allocated(self._device)
            self._slots_at_start = _ops.engine_stats(self._engine)["device_bytes"]
            self._measuring = True

    def _after(self, module, args, output) -> None:
        if self._measuring:
            self._measuring = False
            stats = _ops.engine_stats(self._engine)
            # Sampled at each block's end: what the forward held beyond the slots and what it started with.
            activations = stats["forward_peak_bytes"] - (self._start - self._slots_at_start)
            peak = torch.cuda.max_memory_allocated(self._device)
            if peak > self._peak_before:
                # The forward set the process's peak, so that peak is this forward's, inside blocks included.
                activations = max(activations, peak - self._start - (stats["device_bytes"] - self._slots_at_start))
            self.observe(max(0, activations))
        if torch.compiler.is_compiling():
            return
        order = _ops.engine_order(self._engine)
        if order != self._order:
            # Planned in registration order, run in another: the streamed blocks are spread through
            # the order they run in from the next forward on (only blocks that become resident are copied).
            self._order = order
            try:
                self._replan()
            except ValueError as exc:  # the blocks' sizes in this order need a larger ring: keep the plan
                logger.warning("keeping the device budget's plan made before the execution order was seen: %s", exc)

    def observe(self, activations: int) -> None:
        """A forward needed `activations` bytes besides the weights and slots. More than planned for
        (a larger resolution): fewer blocks stay resident from the next forward on. The forward that
        needed it did not fail: a block that finds no memory frees the other slots first."""
        if activations <= self._activations:
            return
        old = self._activations
        self._activations = activations
        try:
            self._replan()
        except ValueError as exc:
            self._activations = old
            logger.warning("a forward's activations (%.1f MiB) leave no room to plan in: %s", activations / 2**20, exc)
