"""Backward through offloaded blocks (LoRA fine-tuning), exactly.

Autograd saves, in a block's forward, views of the weights it read: views into the device slot the
block ran from. So the block runs from one fixed slot in grad mode (the engine's claim_fixed), and
before its backward reads those views the engine fills that same slot with the same bytes again
(`hold`, from a hook on the block's output gradient), and keeps them there until the block's
backward is done (`unhold`, once the gradients of the block's inputs are complete). Between the
two, the slot serves the blocks after it, as in inference. docs/training.md says what works and what
is refused; docs/design/training.md is the study this follows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.autograd.graph import register_multi_grad_hook
from torch.utils._pytree import tree_leaves

from . import _ops

_graph_task = torch._C._current_graph_task_id  # -1 outside a backward


def _queue_at_backward_end(callback: Callable[[], None]) -> None:
    torch.autograd.Variable._execution_engine.queue_callback(callback)


class Training:
    """One engine's backwards: which forward instances hold a block, per backward (graph task), so
    that the end of each backward releases what its hooks did not (a branch the gradient never
    reached), and a new forward after a backward that raised releases everything."""

    def __init__(self, engine: int, device: torch.device):
        self._engine = engine
        self._device = device
        self._open: dict[int, set[_Instance]] = {}  # graph task -> instances holding a block
        self._anchor: torch.Tensor | None = None

    def release_all(self) -> None:
        """Outside a backward no block is needed by one (a forward starts, or trim): releases the
        holds of a backward that raised, which its own hooks never released."""
        if self._open and _graph_task() == -1:
            for instances in self._open.values():
                for inst in instances:
                    inst.held = False
            self._open.clear()
            _ops.engine_drop_holds(self._engine)

    def anchor(self) -> torch.Tensor:
        """A leaf that requires grad, so that a block whose inputs need no grad gets one (_Anchor)."""
        if self._anchor is None:
            self._anchor = torch.zeros((), device=self._device, requires_grad=True)
        return self._anchor

    def opened(self, inst: _Instance) -> None:
        task = _graph_task()
        instances = self._open.get(task)
        if instances is None:
            instances = self._open[task] = set()
            _queue_at_backward_end(functools.partial(self._backward_ends, task))
        instances.add(inst)
        inst.task = task

    def closed(self, inst: _Instance) -> None:
        self._open.get(inst.task, set()).discard(inst)

    def _backward_ends(self, task: int) -> None:
        for inst in self._open.pop(task, ()):
            inst.release()


class _Instance:
    """One grad-mode forward of one block: the slot token its backward fills again, and whether that
    backward holds the block now."""

    __slots__ = ("block", "token", "held", "task", "__weakref__")

    def __init__(self, block: BlockTraining, token: int):
        self.block, self.token, self.held, self.task = block, token, False, -1

    def acquire(self, grad: torch.Tensor) -> None:
        if not self.held:
            self.block.hold(self)

    def release(self, *grads) -> None:
        if self.held:
            self.held = False
            self.block.unhold(self)


class _Anchor(torch.autograd.Function):
    """Identity on `x` that makes it require grad through a leaf (`anchor`), so that the hook on its
    gradient fires after every node of the block that reads the block's weights. Block 0's input
    needs no grad, and a module's backward hook fires for it before its weights are read."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad if ctx.needs_input_grad[0] else None), None


class BlockTraining:
    """A block's grad-mode pre-hook and post-hook work (hooks.attach_block_hooks calls them)."""

    def __init__(self, training: Training, engine: int, index: int, path: str,
                 offloaded: list[tuple[str, nn.Parameter]], device_type: str):
        # No reference to the block: its hooks hold this, and a cycle would keep a dropped model's
        # engine alive until a gc pass. The hooks pass the block in.
        self._training, self._engine, self._index, self._path = training, engine, index, path
        self._offloaded = offloaded
        self._device_type = device_type
        self._aliases: list[torch.Tensor] = []
        #: Whether the block's current grad-mode forward runs the training way (set by its pre-hook).
        self.active = False

    @staticmethod
    def needs_backward(block: nn.Module, args, kwargs) -> bool:
        """Whether this grad-mode forward can have a backward through the block."""
        return any(isinstance(t, torch.Tensor) and t.requires_grad for t in (*args, *kwargs.values())) or any(
            p.requires_grad for p in block.parameters()
        )

    def enter(self, block: nn.Module, args: tuple, kwargs: dict):
        """Pre-hook in grad mode. The inputs that require grad are replaced by aliases of this
        forward's own: once their gradients are complete, so is this forward's backward."""
        # Inside a backward it is a checkpoint's recompute. It aliases as the forward did: a
        # non-reentrant checkpoint checks that the recompute saves what the forward saved.
        try:
            _ops.engine_enter_grad(self._engine, self._index, _graph_task() != -1)
        except RuntimeError as exc:
            raise RuntimeError(f"block {self._path}: {exc}") from None
        aliases: list[torch.Tensor] = []

        def alias(x):
            if isinstance(x, torch.Tensor) and x.requires_grad:
                x = x.view_as(x)
                aliases.append(x)
            return x

        new_args = tuple(alias(a) for a in args)
        new_kwargs = {k: alias(v) for k, v in kwargs.items()}
        if not aliases and any(p.requires_grad for p in block.parameters()):
            new_args, new_kwargs = self._anchor_first(new_args, new_kwargs, aliases)
        self._aliases = aliases
        return (new_args, new_kwargs) if aliases else None

    def _anchor_first(self, args: tuple, kwargs: dict, aliases: list[torch.Tensor]):
        anchor = self._training.anchor()
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                aliases.append(_Anchor.apply(a, anchor))
                return (*args[:i], aliases[-1], *args[i + 1:]), kwargs
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                aliases.append(_Anchor.apply(v, anchor))
                return args, {**kwargs, k: aliases[-1]}
        return args, kwargs

    def exit(self, output) -> None:
        """Post-hook in grad mode: hooks on the outputs' gradients fetch the block again for its
        backward; one on the gradients of this forward's aliases releases it."""
        aliases, self._aliases = self._aliases, []
        try:
            token = _ops.engine_exit_grad(self._engine, self._index)
        except RuntimeError as exc:
            raise RuntimeError(f"block {self._path}: {exc}") from None
        # autocast caches the casts of leaves that require grad: offloaded ones would outlive their
        # slot (see hooks.py). Frozen weights are never cached, and clearing would cast a LoRA
        # weight afresh for each use, summing its gradients in another order than without offload.
        if torch.is_autocast_enabled(self._device_type) and any(p.requires_grad for _, p in self._offloaded):
            torch.clear_autocast_cache()
        if token < 0:  # a recompute inside the block's own backward, which holds it; or no bytes to fetch
            return
        outputs = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not outputs:
            return
        inst = _Instance(self, token)
        for t in outputs:
            t.register_hook(inst.acquire)
        if aliases:
            register_multi_grad_hook(aliases, inst.release, mode="all")

    def hold(self, inst: _Instance) -> None:
        trainable = [name for name, p in self._offloaded if p.requires_grad]
        if trainable:
            raise RuntimeError(
                f"fastvideo_offload: block {self._path}: {len(trainable)} of its offloaded parameters require grad "
                f"(for example {trainable[0]}); offloaded weights live in host memory, where no gradient can reach "
                "them. Freeze the base weights (model.requires_grad_(False)) before adding LoRA, and call "
                "model.train() before enable(): a model in training mode keeps the trainable parameters inside "
                "its blocks on the device. For a full fine-tune, call disable()."
            )
        try:
            _ops.engine_hold(self._engine, self._index, inst.token)
        except RuntimeError as exc:
            raise RuntimeError(f"block {self._path}: {exc}") from None
        inst.held = True
        self._training.opened(inst)

    def unhold(self, inst: _Instance) -> None:
        self._training.closed(inst)
        _ops.engine_unhold(self._engine, self._index)
