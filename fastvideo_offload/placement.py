"""What `enable` tells the user: the lists it offloads, and how much of the model stays on the device."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from . import formats
from .blocks import BlockList

logger = logging.getLogger("fastvideo_offload")

#: Above this share of the parameter bytes left on the device, enable warns: a list of blocks
#: was probably not found.
WARN_RESIDENT_SHARE = 0.10


def _label(name: str) -> str:
    """Where a parameter lives, with list indices cut off, so that the weights of an unfound list
    add up under the list's path: `blocks.3.attn.weight` -> `blocks`, `head.proj.weight` -> `head.proj`."""
    parts = name.split(".")
    module = parts[:-1] or parts
    for i, part in enumerate(module):
        if part.isdigit():
            module = module[:i] or parts[:1]
            break
    return ".".join(module)


@dataclass
class OffloadReport:
    lists: list[tuple[str, int, int]]  # path, blocks, parameter bytes offloaded
    total_bytes: int
    resident: dict[str, int]  # where parameters stay on the device -> their bytes

    @classmethod
    def measure(cls, model: nn.Module, lists: list[BlockList], offloaded: set[int]) -> OffloadReport:
        """Taken before enable moves anything: afterwards block parameters hold placeholders."""
        per_list = []
        for path, blocks in lists:
            params = {id(p): p for _, block in blocks for p in block.parameters() if id(p) in offloaded}
            per_list.append((path or "<root>", len(blocks), sum(map(formats.nbytes, params.values()))))
        total, resident = 0, {}
        for name, p in model.named_parameters():
            total += formats.nbytes(p)
            if id(p) not in offloaded:
                resident[_label(name)] = resident.get(_label(name), 0) + formats.nbytes(p)
        return cls(per_list, total, resident)

    def log(self, model_name: str, device: torch.device) -> None:
        for path, blocks, nbytes in self.lists:
            logger.info("offloading %s: %d blocks, %.1f MiB", path, blocks, nbytes / 2**20)
        kept = sum(self.resident.values())
        share = kept / self.total_bytes if self.total_bytes else 0.0
        logger.info("%.1f%% of %s's parameter bytes (%.1f MiB) stay on %s", 100 * share, model_name,
                    kept / 2**20, device)
        if share > WARN_RESIDENT_SHARE:
            largest = sorted(self.resident.items(), key=lambda item: -item[1])[:3]
            logger.warning(
                "%.1f%% of %s's parameter bytes stay on %s, the largest in %s; if one of these is a list of blocks, "
                "name it with blocks=[...] to offload it",
                100 * share, model_name, device, ", ".join(f"{name} ({n / 2**20:.1f} MiB)" for name, n in largest),
            )
