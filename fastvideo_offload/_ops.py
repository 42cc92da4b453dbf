"""Loads the C++ op library and gives each op a thin, typed Python face.

Every schema is in csrc/bindings.cpp; this module adds nothing but loading, types and the
fake (meta) implementations of the ops that return a tensor.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.fastvideo_offload)
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        f"fastvideo_offload's C++ extension could not be loaded ({exc}). It is built against the torch that is "
        f"installed when the package is built; this process runs torch {torch.__version__}. Rebuild it with "
        "`pip install --no-build-isolation --force-reinstall .` in this environment."
    ) from exc

_ops = torch.ops.fastvideo_offload

#: Offsets inside a block buffer are multiples of this.
ALIGNMENT = 256


def layout(tensors: list[torch.Tensor], alignment: int = ALIGNMENT) -> tuple[list[int], int]:
    """Aligned byte offsets of `tensors` packed one after another, and the exact total size."""
    result = _ops.layout.default(tensors, alignment)
    return result[:-1], result[-1]


def pack(
    tensors: list[torch.Tensor], offsets: list[int], nbytes: int, pinned: bool, device: torch.device | None = None
) -> torch.Tensor:
    """One exact-size uint8 host buffer holding every tensor's bytes at its offset. A pinned
    buffer is pinned in the context of CUDA `device`, the one its copies go to (None: the
    tensors' device, or else the current one)."""
    return _ops.pack.default(tensors, offsets, nbytes, pinned, device)


@torch.library.register_fake("fastvideo_offload::pack")
def _pack_fake(tensors, offsets, nbytes, pinned, device=None):
    return torch.empty(nbytes, dtype=torch.uint8, device="cpu")


def alloc_host(nbytes: int, pinned: bool, device: torch.device | None = None) -> torch.Tensor:
    """An exact-size uint8 host buffer with its bytes left as they are, for the caller to fill
    (pinned for CUDA `device` when `pinned`)."""
    return _ops.alloc_host.default(nbytes, pinned, device)


@torch.library.register_fake("fastvideo_offload::alloc_host")
def _alloc_host_fake(nbytes, pinned, device=None):
    return torch.empty(nbytes, dtype=torch.uint8, device="cpu")


def pin_host(memory: torch.Tensor, device: torch.device, read_only: bool = False) -> None:
    """Page-locks `memory` (a contiguous CPU tensor someone else allocated) in place for the CUDA
    `device`'s copies (`read_only`: pages mapped without write access); out of memory raises
    torch.OutOfMemoryError, registration the driver does not support NotImplementedError."""
    _ops.pin_host.default(memory, device, read_only)


def unpin_host(memory: torch.Tensor, device: torch.device) -> None:
    """Undoes `pin_host(memory, device)`."""
    _ops.unpin_host.default(memory, device)


def engine_create(device: torch.device, prefetch: int, staging_threads: int = 1, share_staging_with: int = 0) -> int:
    """`share_staging_with`: an engine of the same device whose staging buffers the new one shares
    (the models of a group, which take turns); 0 for buffers of its own."""
    return _ops.engine_create.default(device, prefetch, staging_threads, share_staging_with)


def engine_add_block(
    engine: int, host: torch.Tensor, params: list[torch.Tensor], offsets: list[int], staged: bool = False
) -> int:
    """`staged`: `host` is pageable, and each upload reads it through the engine's staging ring."""
    return _ops.engine_add_block.default(engine, host, params, offsets, staged)


def engine_add_gathered_block(
    engine: int, sources: list[torch.Tensor], nbytes: int, params: list[torch.Tensor], offsets: list[int]
) -> int:
    """A staged block whose parameter i's bytes are `sources[i]` (pages mapped from a checkpoint):
    the staging threads gather them into a buffer of `nbytes` laid out as `offsets` say."""
    return _ops.engine_add_gathered_block.default(engine, sources, nbytes, params, offsets)


engine_enter = _ops.engine_enter.default
engine_exit = _ops.engine_exit.default
engine_reset = _ops.engine_reset.default
# Training (training.py): grad-mode enter and exit, and a backward's holds on its blocks.
engine_enter_grad = _ops.engine_enter_grad.default
engine_exit_grad = _ops.engine_exit_grad.default
engine_hold = _ops.engine_hold.default
engine_unhold = _ops.engine_unhold.default
engine_drop_holds = _ops.engine_drop_holds.default
#: engine_exit_grad: the block has no bytes (or was not entered), or was held already (a recompute).
NO_SLOT, HELD = -1, -2


def engine_set_slot_budget(engine: int, nbytes: int) -> None:
    _ops.engine_set_slot_budget.default(engine, nbytes)


def engine_park(engine: int, block: int) -> None:
    _ops.engine_park.default(engine, block)


def engine_invalidate(engine: int) -> None:
    _ops.engine_invalidate.default(engine)


def engine_trim(engine: int) -> None:
    _ops.engine_trim.default(engine)


def engine_stats(engine: int) -> dict[str, int]:
    return dict(_ops.engine_stats.default(engine))


def engine_order(engine: int) -> list[int]:
    """Every block, in the execution order the engine has learned (registration order before any forward)."""
    return list(_ops.engine_order.default(engine))


def engine_watch_memory(engine: int, on: bool) -> None:
    """While on (CUDA), each block's exit samples the device memory allocated outside the engine's
    slots: stats()["forward_peak_bytes"] is the most the current (or last) forward saw."""
    _ops.engine_watch_memory.default(engine, on)


def engine_trace_staging(engine: int, on: bool) -> None:
    """Whether the engine's staging threads record each piece they copy into the staging ring."""
    _ops.engine_trace_staging.default(engine, on)


def engine_staging_trace(engine: int) -> torch.Tensor:
    """The pieces recorded since the last call, int64 [n, 4]: block, staging thread, start and end
    in nanoseconds of CLOCK_MONOTONIC (`time.monotonic_ns()`); clears them. [0, 4] when the
    engine stages nothing."""
    return _ops.engine_staging_trace.default(engine)


@torch.library.register_fake("fastvideo_offload::engine_staging_trace")
def _engine_staging_trace_fake(engine):
    return torch.empty(torch.library.get_ctx().new_dynamic_size(), 4, dtype=torch.int64, device="cpu")


def engine_destroy(engine: int) -> None:
    _ops.engine_destroy.default(engine)


def engine_set_resident(engine: int, blocks: list[int]) -> None:
    _ops.engine_set_resident.default(engine, blocks)
