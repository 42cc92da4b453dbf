"""Submodules of offloaded blocks that run outside their block's forward.

DiT's output head calls `transformer_blocks[0].norm1.emb(...)` after the block loop, when block 0
holds placeholders. A probe pre-hook on every block submodule that holds offloaded weights notices
such a call (its weights are placeholders, so its block is not entered); from then on that
submodule runs outside its block from device copies of its own weights, kept resident, and inside
its block from the block's slot as before. A probe costs one check per call.

The probes stay for good, so that a call first made in a later forward (a branch taken only at some
step) is found too, and because a compiled block guards on its submodules' hooks: removing them
would recompile it. Inside a compiled region they trace to nothing rather than breaking the graph
(a block compiled on its own, as in FastVideo's regional compile, runs inside its own forward); a
submodule called outside its block from compiled code is not supported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from . import formats
from .hooks import Hooks

logger = logging.getLogger("fastvideo_offload")


class _Resident:
    """One submodule's offloaded weights kept on the device, swapped in for calls outside its block."""

    def __init__(self, params: list[nn.Parameter], views: list[torch.Tensor], copy: Callable):
        self.params, self.views, self._copy = params, views, copy
        self.copies = [copy(v) for v in views]
        self.saved: list[torch.Tensor] = []

    def nbytes(self) -> int:
        return sum(c.untyped_storage().nbytes() for c in self.copies)

    def refresh(self) -> None:
        self.copies = [self._copy(v) for v in self.views]

    def swap_in(self) -> None:
        self.saved = [p.data for p in self.params]
        for p, c in zip(self.params, self.copies):
            p.data = c

    def swap_out(self, module, args, output) -> None:
        if self.saved and not torch.compiler.is_compiling():
            for p, d in zip(self.params, self.saved):
                p.data = d
            self.saved = []


class OutsideCalls:
    """Finds block submodules called while their block is not entered, and keeps their weights resident."""

    def __init__(
        self,
        blocks: list[tuple[str, nn.Module]],
        host_views: dict[int, torch.Tensor],
        copy: Callable[[torch.Tensor], torch.Tensor],
        hooks: Hooks,
    ):
        self._copy = copy
        self._resident: list[_Resident] = []
        self._hooks = hooks  # the model's: the probes, and the post-hooks added when a call is found
        for path, block in blocks:
            for name, sub in block.named_modules():
                # What the engine swaps: a wrapper subclass's (torchao's) inner tensors.
                held = [h for p in sub.parameters() for _, h in formats.holders("", p)]
                params = [h for h in held if id(h) in host_views and host_views[id(h)].numel()]
                if sub is block or not params:
                    continue
                views = [host_views[id(p)] for p in params]
                hooks.add(sub.register_forward_pre_hook(self._probe(f"{path}.{name}", params, views)))

    def _probe(self, name: str, params: list[nn.Parameter], views: list[torch.Tensor]):
        found: list[_Resident] = []

        def probe(module, args):
            if torch.compiler.is_compiling() or params[0].numel() != 0:
                return  # inside its block (or inside a compiled block, where this traces to nothing)
            if not found:
                found.append(_Resident(params, views, self._copy))
                self._resident.append(found[0])
                # torch reads a module's post-hooks after its forward: this one runs for this call too.
                self._hooks.add(module.register_forward_hook(found[0].swap_out, always_call=True))
                logger.info(
                    "%s runs outside its block's forward: its %.2f MiB of weights stay resident for those calls",
                    name, found[0].nbytes() / 2**20,
                )
            found[0].swap_in()

        return probe

    def nbytes(self) -> int:
        """Device bytes of the weights kept resident for calls outside their block."""
        return sum(r.nbytes() for r in self._resident)

    def refresh(self) -> None:
        """Copies the host store's weights again (after load_state_dict or mutate)."""
        for r in self._resident:
            r.refresh()
