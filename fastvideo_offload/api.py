"""The one door: `enable`, `disable` and `handle_of`. The rooms behind it (offloader.py for a
model, pipeline.py for a diffusers pipeline) never import this module back."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from . import registry, share as node_share
from .blocks import find_block_lists
from .checkpoint import CheckpointWeights
from .config import OffloadConfig, resolve_device
from .offloader import OffloadHandle
from .pipeline import PipelineHandle, check_pipeline_arguments, is_pipeline
from .sources import LiveWeights


def enable(
    model,
    *,
    device: torch.device | str | int | None = None,
    prefetch: int = 1,
    blocks: Sequence[str] | None = None,
    group: str | None = None,
    device_budget: int | str | None = None,
    checkpoint: str | os.PathLike | CheckpointWeights | None = None,
    share=None,
    host_pin_budget: int | str | None = None,
    staging_threads: int = 1,
) -> OffloadHandle | PipelineHandle:
    """Offloads `model`'s transformer blocks to host memory and streams each one to `device` just
    before it runs; everything else moves to `device`. Returns the OffloadHandle (stats, `mutate`,
    `trim`, `disable`), or for a diffusers DiffusionPipeline a pipeline.PipelineHandle that places
    every component under one budget (see pipeline.py).

    Args:
        model: an nn.Module holding its blocks in lists (nn.ModuleList or nn.Sequential), or a
            diffusers DiffusionPipeline.
        device: where the blocks run: "cuda", "cuda:N" (or N) or "cpu" (a CPU "device" streams into CPU
            slots, as the tests do); None: the current CUDA device if there is one, else the CPU.
        prefetch: how many blocks are copied ahead of the running one (0: each is copied when it
            starts). Cut to the number of other blocks: no more can be in flight.
        blocks: attribute paths of the lists to offload, every item of each a block, for example
            ["blocks"] or ["transformer_blocks", "single_transformer_blocks"]; None: every list of
            blocks found at any depth (blocks.py says how they are recognised).
        group: a name; models enabled with the same group take turns on the device: when one
            starts a forward the others free their slots (Wan2.2's two experts).
        device_budget: the device bytes the whole model may take, or "auto" on CUDA (free memory
            less headroom): the blocks that fit stay resident, the rest stream (budget.py).
        checkpoint: a safetensors file, a sharded checkpoint's index json, a directory holding
            either, or a CheckpointWeights(path, rename=...) whose keys a loader renames. The
            weights are read from it straight into the host store, so a model built on the meta
            device is offloaded without ever being whole in host memory.
        share: "node" (or a ProcessGroup) keeps one host copy of the blocks per node for the ranks
            of torch.distributed's default group (or of that group); every rank must call enable
            with the same weights or the same checkpoint, which the node's leader alone reads
            (share.py).
        host_pin_budget: the host bytes that may be pinned, or "auto" (what the cgroup limit and
            MemAvailable leave, less headroom; pinning.py); the blocks beyond it stay pageable and
            are copied ahead of their upload into a small ring of pinned staging buffers. None:
            every block pinned.
        staging_threads: host threads that fill the staging ring (1 to 64).

    A refused or failed call leaves the model as it was."""
    if is_pipeline(model):
        check_pipeline_arguments(blocks, group, checkpoint, share, host_pin_budget)
        if registry.handle_of(model) is not None:
            raise RuntimeError(f"offload is already enabled on this {type(model).__name__}; disable it first")
        return PipelineHandle(model, OffloadConfig(resolve_device(device), prefetch, device_budget=device_budget))
    shared = node_share.resolve(share)
    try:  # from here on a failure is told to the other ranks of a share, which would wait for this one
        if not isinstance(model, nn.Module):
            raise TypeError(f"enable expects an nn.Module or a diffusers DiffusionPipeline, got {type(model).__name__}")
        if registry.handle_of(model) is not None:
            raise RuntimeError(f"offload is already enabled on this {type(model).__name__}; disable it first")
        config = OffloadConfig(resolve_device(device), prefetch, blocks, group, device_budget, host_pin_budget,
                               staging_threads)
        if checkpoint is None:
            source = LiveWeights()
        else:
            source = checkpoint if isinstance(checkpoint, CheckpointWeights) else CheckpointWeights(checkpoint)
        if shared is not None:
            source = shared.over(source)
        return OffloadHandle(model, find_block_lists(model, config.blocks), config, source)
    except BaseException as exc:
        if shared is not None:
            shared.abandon(exc)  # the other ranks learn it in the share's first step
        raise


def disable(model) -> None:
    """Undoes `enable(model)` (a model or a pipeline)."""
    handle = registry.handle_of(model)
    if handle is None:
        raise RuntimeError(f"offload is not enabled on this {type(model).__name__}")
    handle.disable()


def handle_of(model) -> OffloadHandle | PipelineHandle | None:
    """The handle of an offloaded model or pipeline, or None."""
    return registry.handle_of(model)
