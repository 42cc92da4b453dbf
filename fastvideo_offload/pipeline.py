"""`enable(pipe, ...)` on a diffusers DiffusionPipeline: every component placed under one device budget.

Which component goes where (diffusers' component names):
- `transformer*` (Wan2.2's `transformer` and `transformer_2`): offloaded as one group, the blocks that
  fit the budget resident;
- any other component with a block list whose weights exceed what streaming it keeps on the device
  (its non-block weights and buffers plus `1 + prefetch` of its largest block), the VAE excepted:
  offloaded into the same group, every block streamed (a text encoder runs once per prompt, so
  residency would buy one copy per prompt);
- the rest (the VAE, which runs through `decode` rather than `forward`, so the group's turn-taking
  would never see it; components with no block list or too few blocks to gain): moved whole.

The budget: whatever stays on the device for good (the moved components, every offloaded
component's non-block weights and buffers) comes off first; the group takes turns, so what is left
holds either one streamed component's ring or one transformer's plan, and each transformer is
planned with all of it.
"""

from __future__ import annotations

import itertools
import sys

import torch
from torch import nn

from . import formats, registry
from .blocks import find_block_lists
from .budget import auto_device_budget
from .config import OffloadConfig
from .offloader import OffloadHandle, footprint
from .planner import plan, ring_slots
from .sources import LiveWeights

PLANNED, STREAMED, MOVED = "planned", "streamed", "moved"
_groups = itertools.count()


def _nbytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    return sum(map(formats.nbytes, tensors.values()))  # a tensor subclass by its inner tensors


class _Placement:
    """Where each parameter and buffer of a component was, to put it back there."""

    def __init__(self, module: nn.Module):
        self.params = [(p, p.device) for p in module.parameters()]
        self.buffers = [(m, name, buf.device) for m in module.modules() for name, buf in m._buffers.items()
                        if buf is not None]
        devices = {device for _, device in self.params}
        # Block weights go straight from the host store back to this device when it is the only one.
        self.home = devices.pop() if len(devices) == 1 else None

    def move(self, device: torch.device) -> None:
        self._put(lambda home: device)

    def restore(self) -> None:
        self._put(lambda home: home)

    def _put(self, where) -> None:
        with torch.no_grad():
            for p, home in self.params:
                if p.device != where(home):
                    p.data = p.data.to(where(home))
            for module, name, home in self.buffers:
                if module._buffers[name].device != where(home):
                    module._buffers[name] = module._buffers[name].to(where(home))


class PipelineHandle:
    """What `enable(pipe)` returns: per-component stats, and `disable` for all of them."""

    def __init__(self, pipe, config: OffloadConfig):
        components = {name: m for name, m in pipe.components.items() if isinstance(m, nn.Module)}
        for name, module in components.items():
            if registry.handle_of(module) is not None:
                raise RuntimeError(f"enable(pipeline): offload is already enabled on its {name}; disable it first")
        # Sized and planned before anything changes: a pipeline refused is left as it was.
        self.placement: dict[str, str] = {}
        staying: dict[str, int] = {}
        sizes: dict[str, list[int]] = {}
        device, prefetch = config.device, config.prefetch
        for name, module in components.items():
            kept, block_sizes = (0, []) if name.startswith("vae") else footprint(module)
            ring = ring_slots(prefetch, len(block_sizes)) * max(block_sizes, default=0)
            if name.startswith("transformer") and block_sizes:
                self.placement[name] = PLANNED
            elif block_sizes and kept + ring < _nbytes(module):
                self.placement[name] = STREAMED
            else:
                self.placement[name] = MOVED
                kept = _nbytes(module)
            staying[name], sizes[name] = kept, block_sizes
        self.device = device
        device_budget = config.device_budget
        if device_budget == "auto":
            device_budget = auto_device_budget(device, list(components.values()))
        self.device_budget = device_budget
        self.shares: dict[str, int] = {}
        if self.device_budget is not None:
            self._split(staying, sizes, prefetch)

        self._pipe = pipe
        self._placements = {name: _Placement(m) for name, m in components.items()}
        self.handles: dict[str, OffloadHandle] = {}
        group = f"fastvideo_offload.pipeline.{next(_groups)}"
        order = [n for role in (STREAMED, PLANNED) for n, r in self.placement.items() if r == role]
        try:
            for name in order:
                module = components[name]
                self.handles[name] = OffloadHandle(
                    module, find_block_lists(module), config.replace(group=group, device_budget=self.shares.get(name)),
                    LiveWeights(),
                )
            for name, role in self.placement.items():
                if role == MOVED:
                    self._placements[name].move(device)
        except BaseException:
            self._undo(list(self.placement))
            raise
        self._moved_bytes = {name: staying[name] for name, role in self.placement.items() if role == MOVED}
        registry.attach(pipe, self)

    def _split(self, staying: dict[str, int], sizes: dict[str, list[int]], prefetch: int) -> None:
        budget = self.device_budget
        held = sum(staying.values())
        left = budget - held
        what = f"device_budget: {budget} bytes less the {held} that stay on the device (" + ", ".join(
            f"{n} {b}" for n, b in staying.items() if b) + f") leave {left}"
        if left < 0:
            raise ValueError(f"{what}; raise the budget")
        for name, role in self.placement.items():
            slots = ring_slots(prefetch, len(sizes[name]))
            ring = slots * max(sizes[name], default=0)
            if role == STREAMED and ring > left:
                raise ValueError(f"{what}, less than streaming {name} needs: {slots} slot(s) of its largest "
                                 f"block, {ring} bytes; raise the budget or lower prefetch")
            if role == PLANNED:
                try:
                    plan(sizes[name], left, slots)
                except ValueError as exc:
                    raise ValueError(f"{what} for the blocks of {name}: {exc}") from None
                # Its own non-block weights are counted again by its DeviceBudget.
                self.shares[name] = left + staying[name]

    def _undo(self, names: list[str]) -> None:
        """Puts the named components back where they were, the offloaded ones first disabled."""
        for name in reversed(names):
            handle = self.handles.get(name)
            if handle is not None:
                handle.disable(device=self._placements[name].home)
                del self.handles[name]
            self._placements.pop(name).restore()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per component: an offloaded one's `OffloadHandle.stats()`, a moved one's `device_bytes`."""
        stats = {name: handle.stats() for name, handle in self.handles.items()}
        stats.update((name, {"device_bytes": n}) for name, n in self._moved_bytes.items())
        return stats

    @property
    def enabled(self) -> bool:
        return bool(self._placements)

    def disable(self) -> None:
        """Every component back where it was before enable, bit-exact. One that cannot be disabled
        (out of memory) raises with it and the ones not yet done still offloaded; call again."""
        if not self.enabled:
            raise RuntimeError("offload is already disabled for this pipeline")
        self._undo(list(self._placements))
        registry.detach(self._pipe, self)


def is_pipeline(obj) -> bool:
    """Whether `obj` is a diffusers DiffusionPipeline; diffusers is never imported for it (one not
    imported yet made none)."""
    diffusers = sys.modules.get("diffusers")
    return diffusers is not None and isinstance(obj, diffusers.DiffusionPipeline)


def check_pipeline_arguments(blocks, group, checkpoint, share, host_pin_budget) -> None:
    """Refuses what `enable` takes for a model but a pipeline chooses per component."""
    if checkpoint is not None or share is not None or host_pin_budget is not None:
        raise ValueError("checkpoint=, share= and host_pin_budget= apply to a model: a pipeline's components "
                         "load their own weights and are not shared between ranks")
    if blocks is not None or group is not None:
        raise ValueError("enable(pipeline): blocks= and group= are chosen per component for a pipeline; enable a "
                         "component on its own to set them")
