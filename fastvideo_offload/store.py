"""The host copy of one block: its parameters packed into one exact-size buffer, or, for a
block staged from a checkpoint, its tensors left where the checkpoint's mapped pages hold them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ops, formats


@dataclass
class BlockStore:
    # One entry per holder (formats.holders): a plain parameter, or a wrapper subclass's inner tensor.
    names: list[str]  # qualified names in the model, for error messages
    params: list[torch.Tensor]  # the tensors whose .data the engine swaps
    buffer: torch.Tensor  # uint8, exactly as large as the packed holders (gathered: empty)
    offsets: list[int]  # of each holder in `buffer`, and in a device slot
    views: list[torch.Tensor]  # each holder's bytes in host memory, with its dtype, shape and strides
    weights: list[tuple[torch.nn.Parameter, int]]  # each parameter the module holds, and its count of holders
    staged: bool = False  # pageable, outside the pin budget: its uploads go through the staging ring
    size: int = -1  # the packed bytes: `buffer`'s, or what a gathered block's staging fills
    gathered: bool = False  # `views` lie elsewhere (mapped pages), not in `buffer`

    def __post_init__(self):
        if self.size < 0:
            self.size = self.buffer.numel()

    def add_to(self, engine: int) -> int:
        """Registers the block with the engine, which from now on swaps its parameters."""
        if self.gathered:
            return _ops.engine_add_gathered_block(engine, self.views, self.size, self.params, self.offsets)
        return _ops.engine_add_block(engine, self.buffer, self.params, self.offsets, self.staged)

    @staticmethod
    def nbytes(params: list[torch.nn.Parameter]) -> int:
        """The exact size of the host buffer `pack` allocates for `params`."""
        return _ops.layout([formats.plain(h) for p in params for _, h in formats.holders("", p)])[1]

    @classmethod
    def pack(
        cls, names: list[str], params: list[torch.nn.Parameter], pinned: bool, device: torch.device | None = None
    ) -> BlockStore:
        """`device`: the CUDA device a pinned buffer is for, so its context (not the current
        device's) owns the pinning."""
        def packed(tensors, offsets, nbytes):
            if not tensors:
                return torch.empty(0, dtype=torch.uint8)
            return _ops.pack(tensors, offsets, nbytes, pinned, device)

        return cls._laid_out(names, params, packed)

    @classmethod
    def _laid_out(cls, names, params, buffer_for) -> BlockStore:
        """A store of `params`' holders (formats.holders) at their aligned offsets in the buffer that
        `buffer_for(tensors, offsets, nbytes)` gives."""
        held = [formats.holders(name, p) for name, p in zip(names, params)]
        flat = [h for hs in held for h in hs]
        tensors = [formats.plain(h) for _, h in flat]
        offsets, nbytes = _ops.layout(tensors)
        buffer = buffer_for(tensors, offsets, nbytes)
        views = [_view(buffer, off, t) for off, t in zip(offsets, tensors)]
        weights = [(p, len(hs)) for p, hs in zip(params, held)]
        return cls([n for n, _ in flat], [h for _, h in flat], buffer, offsets, views, weights)

    def host_weights(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """Each parameter with its value in the host store, in its own format (a torchao or GGUF
        tensor around host views): what state_dict returns and load_state_dict writes into."""
        out, start = [], 0
        for p, count in self.weights:
            out.append((p, formats.rebuild(p, self.views[start : start + count])))
            start += count
        return out

    @classmethod
    def allocate(
        cls, names: list[str], params: list[torch.nn.Parameter], pinned: bool, device: torch.device | None = None
    ) -> BlockStore:
        """A store laid out as `pack` lays it out whose views the caller fills (the parameters
        may be on the meta device). Only the padding between them is written here, so that the
        buffer's bytes depend on its tensors alone, as a packed one's do."""
        tensors = [p.detach() for p in params]
        offsets, nbytes = _ops.layout(tensors)
        buffer = _ops.alloc_host(nbytes, pinned, device)
        views = [_view(buffer, off, t) for off, t in zip(offsets, tensors)]
        end = 0
        for off, view in sorted(zip(offsets, views), key=lambda item: item[0]):
            buffer[end:off].zero_()
            end = off + span_elements(view) * view.element_size()
        buffer[end:].zero_()
        # A checkpoint's parameters are plain: each one is its own single holder.
        return cls(names, params, buffer, offsets, views, [(p, 1) for p in params])

    @classmethod
    def gathered_from(
        cls, names: list[str], params: list[torch.nn.Parameter], sources: list[torch.Tensor]
    ) -> BlockStore:
        """A staged store whose host bytes stay in `sources` (each parameter's value, contiguous,
        in mapped pages of a checkpoint): nothing is allocated or copied; each staging gathers them."""
        offsets, nbytes = _ops.layout([p.detach() for p in params])
        return cls(names, params, torch.empty(0, dtype=torch.uint8), offsets, sources, [(p, 1) for p in params],
                   staged=True, size=nbytes, gathered=True)

    @classmethod
    def over(cls, names: list[str], params: list[torch.nn.Parameter], buffer: torch.Tensor) -> BlockStore:
        """A store laid out as `pack` lays it out, in `buffer` (exactly `nbytes(params)` bytes that
        someone else allocated: a node's shared region). Its bytes are not written here."""
        def given(tensors, offsets, nbytes):
            if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() != nbytes:
                raise ValueError(f"BlockStore.over: expected a 1-D uint8 buffer of {nbytes} bytes, got "
                                 f"{buffer.dtype} {tuple(buffer.shape)}")
            return buffer

        return cls._laid_out(names, params, given)


def span_elements(t: torch.Tensor) -> int:
    """Elements from `t`'s first to its last in memory (gaps and elements shared by overlapping
    strides included): what the layout gives it."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0


def _view(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    # Offsets are 256-aligned, and so is a buffer that is a slice of a larger one (a shared region):
    # a whole number of elements of any dtype.
    view = torch.empty(0, dtype=like.dtype)
    start = buffer.storage_offset() + offset
    return view.set_(buffer.untyped_storage(), start // like.element_size(), like.shape, like.stride())


def span(t: torch.Tensor) -> torch.Tensor:
    """The elements from `t`'s first to its last in memory, as a 1-D tensor: the bytes a store
    holds for it (gaps and elements shared by overlapping strides included)."""
    return t.as_strided((span_elements(t),), (1,))
