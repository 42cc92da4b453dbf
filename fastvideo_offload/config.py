"""`enable`'s arguments, checked once into one frozen object that every room of an offloaded model
receives: OffloadConfig. Where the weights come from (the live model, a checkpoint, a node's share)
is not configuration but a source (sources.py, checkpoint.py, share.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .arguments import byte_count

MAX_STAGING_THREADS = 64


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
    """How one model (or each component of a pipeline) is offloaded; `enable`'s docstring says what
    each field means. Building one checks every field: a wrong type is a TypeError, a value out of
    range a ValueError, each naming the argument."""

    device: torch.device
    prefetch: int = 1
    blocks: Sequence[str] | None = None  # checked where the lists are found (blocks.find_block_lists)
    group: str | None = None
    device_budget: int | str | None = None
    host_pin_budget: int | str | None = None
    staging_threads: int = 1

    def __post_init__(self):
        if not isinstance(self.device, torch.device):
            raise TypeError(f"device must be a torch.device here (see resolve_device), got {self.device!r}")
        _count("prefetch", self.prefetch, 0)
        if self.group is not None and not isinstance(self.group, str):
            raise TypeError(f"group must be a string, got {type(self.group).__name__}")
        byte_count("device_budget", self.device_budget, auto=True, none=True)
        byte_count("host_pin_budget", self.host_pin_budget, auto=True, none=True)
        _count("staging_threads", self.staging_threads, 1, MAX_STAGING_THREADS)

    def replace(self, **changes) -> OffloadConfig:
        return dataclasses.replace(self, **changes)


def _count(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if high is None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")


def resolve_device(device: torch.device | str | int | None) -> torch.device:
    """None means the current CUDA device when there is one, else the CPU."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: {device!r} is not a device") from exc
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"device: offloading to {device.type} is not supported (cpu or cuda)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = device.index if device.index is not None else (torch.cuda.current_device() if count else 0)
    if index >= count:
        raise ValueError(f"device: {device} does not exist ({count} CUDA device(s) visible)")
    # Tensor.is_pinned() answers False until torch has set up CUDA, and enable() may be a
    # process's first CUDA call.
    torch.cuda.init()
    return torch.device("cuda", index)
