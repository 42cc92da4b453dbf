"""The host copy of one block: its parameters packed into one exact-size buffer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ops


@dataclass
class BlockStore:
    names: list[str]  # qualified names in the model, for error messages
    params: list[torch.nn.Parameter]
    buffer: torch.Tensor  # uint8, exactly as large as the packed parameters
    offsets: list[int]
    views: list[torch.Tensor]  # each parameter's bytes in `buffer`, with its dtype, shape and strides

    @staticmethod
    def nbytes(params: list[torch.nn.Parameter]) -> int:
        """The exact size of the host buffer `pack` allocates for `params`."""
        return _ops.layout([p.detach() for p in params])[1]

    @classmethod
    def pack(
        cls, names: list[str], params: list[torch.nn.Parameter], pinned: bool, device: torch.device | None = None
    ) -> BlockStore:
        """`device`: the CUDA device a pinned buffer is for, so its context (not the current
        device's) owns the pinning."""
        tensors = [p.detach() for p in params]
        offsets, nbytes = _ops.layout(tensors)
        if tensors:
            buffer = _ops.pack(tensors, offsets, nbytes, pinned, device)
        else:
            buffer = torch.empty(0, dtype=torch.uint8)
        views = [_view(buffer, off, t) for off, t in zip(offsets, tensors)]
        return cls(names, params, buffer, offsets, views)

    @classmethod
    def over(cls, names: list[str], params: list[torch.nn.Parameter], buffer: torch.Tensor) -> BlockStore:
        """A store laid out as `pack` lays it out, in `buffer` (exactly `nbytes(params)` bytes that
        someone else allocated: a node's shared region). Its bytes are not written here."""
        tensors = [p.detach() for p in params]
        offsets, nbytes = _ops.layout(tensors)
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() != nbytes:
            raise ValueError(f"BlockStore.over: expected a 1-D uint8 buffer of {nbytes} bytes, got {buffer.dtype} "
                             f"{tuple(buffer.shape)}")
        views = [_view(buffer, off, t) for off, t in zip(offsets, tensors)]
        return cls(names, params, buffer, offsets, views)


def _view(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    # Offsets are 256-aligned, and so is a buffer that is a slice of a larger one (a shared region):
    # a whole number of elements of any dtype.
    view = torch.empty(0, dtype=like.dtype)
    start = buffer.storage_offset() + offset
    return view.set_(buffer.untyped_storage(), start // like.element_size(), like.shape, like.stride())


def span(t: torch.Tensor) -> torch.Tensor:
    """The elements from `t`'s first to its last in memory, as a 1-D tensor: the bytes a store
    holds for it (gaps and elements shared by overlapping strides included)."""
    n = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
    return t.as_strided((n,), (1,))
