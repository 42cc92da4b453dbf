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


def _view(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    # Offsets are 256-aligned, so they are a whole number of elements of any dtype.
    view = torch.empty(0, dtype=like.dtype)
    return view.set_(buffer.untyped_storage(), offset // like.element_size(), like.shape, like.stride())
