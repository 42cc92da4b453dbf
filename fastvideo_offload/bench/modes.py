"""The ways of running one model that the benchmark puts side by side.

Every mode starts from the same model, built fresh on the CPU, and leaves it ready to run on
the device. Peers' offloaders are used when their packages are installed, exactly as their
documentation says to call them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .. import offloader


@dataclass(frozen=True)
class Mode:
    name: str
    prepare: Callable[[nn.Module, torch.device], None]
    #: why this mode cannot run here, or None
    unavailable: Callable[[torch.device], str | None] = lambda device: None


def _needs(package: str, cuda: bool = False):
    def check(device: torch.device) -> str | None:
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed"
        if cuda and device.type != "cuda":
            return f"{package}'s offload needs a CUDA device"
        return None

    return check


def _resident(model, device):
    model.to(device)


def _ours(prefetch: int):
    def prepare(model, device):
        offloader.enable(model, device=device, prefetch=prefetch)

    return prepare


def _fastvideo(model, device):
    from fastvideo.hooks.layerwise_offload import enable_layerwise_offload

    # FastVideo's loader builds the whole DiT on the GPU, then offloads it.
    model.to(device)
    enable_layerwise_offload(model)


def _diffusers(model, device):
    from diffusers.hooks import apply_group_offloading

    apply_group_offloading(
        model,
        onload_device=device,
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=device.type == "cuda",
    )


def _accelerate(model, device):
    from accelerate import cpu_offload

    cpu_offload(model, execution_device=device)


def all_modes() -> list[Mode]:
    return [
        Mode("resident", _resident),
        Mode("ours p1", _ours(1)),
        Mode("ours p2", _ours(2)),
        Mode("fastvideo", _fastvideo, _needs("fastvideo", cuda=True)),
        Mode("diffusers group", _diffusers, _needs("diffusers")),
        Mode("accelerate", _accelerate, _needs("accelerate")),
    ]


def host_bytes(model: nn.Module) -> int | None:
    """Host bytes our engine keeps (exact), or None for other modes."""
    handle = offloader.handle_of(model)
    return handle.stats()["host_bytes"] if handle is not None else None
