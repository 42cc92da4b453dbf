"""Offloaded bytes that stay in memory anyway, found right after `enable` moved the blocks.

Offloading frees a parameter's bytes only if nothing else holds its storage: a block that keeps
the fused tensor its q/k/v parameters are views of, a kept computed weight (the legacy hook-based
`weight_norm` keeps `weight` beside `weight_g` and `weight_v`), a backend's private copy. Then
offload saves nothing for those bytes, and the user is told how many.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

logger = logging.getLogger("fastvideo_offload")


class RetainedCheck:
    """Weak references to the offloaded parameters' storages, taken before they are offloaded."""

    def __init__(self, named_params: list[tuple[str, torch.Tensor]]):
        self._storages: dict[tuple[str, int], tuple[StorageWeakRef, int, list[str]]] = {}
        for name, p in named_params:
            storage = p.untyped_storage()
            if storage.nbytes() == 0:
                continue
            key = (str(p.device), storage.data_ptr())
            if key not in self._storages:
                self._storages[key] = (StorageWeakRef(storage), storage.nbytes(), [])
            self._storages[key][2].append(name)

    def measure(self, blocks: list[tuple[str, nn.Module]]) -> int:
        """Bytes still held after offloading (call it once nothing of enable's own holds the old
        tensors): storages of offloaded parameters that are still alive, and tensors that block
        modules keep outside their parameters and buffers. Logs a warning naming them."""
        found: dict[tuple[str, int], list] = {}  # storage -> [bytes, parameters it backs, attribute holding it]
        for key, (ref, nbytes, names) in self._storages.items():
            if not ref.expired():
                found[key] = [nbytes, names[0] + (" and others" if len(names) > 1 else ""), None]
        for path, block in blocks:
            for name, module in block.named_modules():
                for attr, value in vars(module).items():
                    if isinstance(value, torch.Tensor) and value.numel():
                        storage = value.untyped_storage()
                        key = (str(value.device), storage.data_ptr())
                        entry = found.setdefault(key, [storage.nbytes(), None, None])
                        entry[2] = ".".join(filter(None, (path, name, attr)))
        total = sum(n for n, _, _ in found.values())
        if total:
            where = [_describe(*entry) for entry in found.values()]
            logger.warning(
                "offloading leaves %.2f MiB of the blocks' memory where it was: %s%s",
                total / 2**20, "; ".join(where[:5]), "; ..." if len(where) > 5 else "",
            )
        return total


def _describe(nbytes: int, params: str | None, attr: str | None) -> str:
    size = f"{nbytes / 2**20:.2f} MiB"
    if params and attr:
        return f"{attr} keeps the storage of {params} ({size})"
    if params:
        return f"the storage of {params} is referenced outside the model's parameters ({size})"
    return (f"{attr} is a tensor the block keeps beside its parameters, never offloaded, such as legacy "
            f"weight_norm's computed weight ({size})")
