"""Weight formats under offload: a forward that replaces a weight's data is refused loudly."""

from __future__ import annotations

import copy

import pytest
import torch
from models import TinyDiT
from torch import nn

import fastvideo_offload as fo

X = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))


class Repacking(nn.Module):
    """Assigns new data to its weight inside forward, as bitsandbytes' 4-bit layers do on their first call."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x):
        self.lin.weight.data = self.lin.weight.data.clone()
        return self.lin(x)


def test_forward_replacing_a_weight_is_refused():
    model = TinyDiT(dim=32, layers=3)
    model.blocks[1] = Repacking(32)
    saved = copy.deepcopy(model.state_dict())
    handle = fo.enable(model, device="cpu")
    for _ in range(2):  # the engine stays usable: the next forward is refused the same way
        with pytest.raises(RuntimeError, match=r"block blocks\.1: the forward of offloaded block 1 replaced the "
                                               r"data of its parameter 0 \(Float \[32, 32\]\)"):
            with torch.no_grad():
                model(X)
        assert model.blocks[1].lin.weight.numel() == 0  # the placeholder is back
    handle.disable()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
