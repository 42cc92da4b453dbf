"""The forward pre-hook and post-hook of an offloaded block: one C++ call each, nothing else."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import _ops


def attach_block_hooks(block: nn.Module, engine: int, index: int) -> list[RemovableHandle]:
    enter, exit_ = _ops.engine_enter, _ops.engine_exit

    # Disabled for the compiler: the swap must stay eager, outside any compiled graph.
    @torch.compiler.disable
    def pre_forward(module, args):
        enter(engine, index)

    @torch.compiler.disable
    def post_forward(module, args, output):
        exit_(engine, index)

    return [
        block.register_forward_pre_hook(pre_forward),
        # always_call: the block is released also when its forward raised.
        block.register_forward_hook(post_forward, always_call=True),
    ]
