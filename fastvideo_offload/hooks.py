"""The hooks of an offloaded model: the set that holds them all, removed together, and the forward
pre-hook and post-hook of a block (one C++ call each in inference; in a forward that can have a
backward, training.py's)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.compiler import is_compiling
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import _ops
from .training import BlockTraining


class Hooks:
    """Every hook one offloaded model puts on its modules (blocks, state_dict, budget, outside calls),
    whichever room attached it: `disable`, or an `enable` that failed, removes them in one place."""

    def __init__(self):
        self._handles: list[RemovableHandle] = []

    def add(self, *handles: RemovableHandle) -> None:
        self._handles.extend(handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def eager(hook: Callable) -> Callable:
    """`hook`, kept out of any compiled graph (the swap must run eagerly, around a compiled block or
    between the graphs of a compiled model) without loading the compiler before anything compiles:
    `torch.compiler.disable` imports torch._dynamo (1-2 s, 150 MB), so it is applied when the
    compiler, tracing this hook, is loaded anyway."""
    disabled: list[Callable] = []

    @functools.wraps(hook)
    def run(*args):
        if is_compiling():
            if not disabled:
                disabled.append(torch.compiler.disable(hook))
            return disabled[0](*args)
        return hook(*args)

    return run


def attach_block_hooks(
    block: nn.Module, path: str, engine: int, index: int, device_type: str, training: BlockTraining
) -> list[RemovableHandle]:
    enter, exit_ = _ops.engine_enter, _ops.engine_exit
    autocast_on, drop_casts = torch.is_autocast_enabled, torch.clear_autocast_cache
    grad_on = torch.is_grad_enabled

    @eager
    def pre_forward(module, args, kwargs):
        # A forward that can have a backward runs the training way (training.py); under no_grad or
        # inference_mode this check is all it costs.
        if grad_on():
            training.active = training.needs_backward(module, args, kwargs)
            if training.active:
                return training.enter(module, args, kwargs)
        enter(engine, index)
        return None

    @eager
    def post_forward(module, args, output):
        if grad_on() and training.active:
            training.exit(output)
            return
        try:
            exit_(engine, index)
        except RuntimeError as exc:  # the engine names blocks by index; users know them by path
            raise RuntimeError(f"block {path}: {exc}") from None
        # autocast caches the low-precision copy of every fp32 parameter that requires grad, keyed
        # by the parameter, until its region ends: kept, those copies would hold every block on the
        # device (offload defeated) and go on serving the old weights after a change. Dropped here,
        # a block's copies live no longer than its slot, and the next forward casts afresh.
        if autocast_on(device_type):
            drop_casts()

    return [
        block.register_forward_pre_hook(pre_forward, with_kwargs=True),
        # always_call: the block is released also when its forward raised.
        block.register_forward_hook(post_forward, always_call=True),
    ]
