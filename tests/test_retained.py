"""enable says how many of the bytes it offloads stay in memory anyway (a fused tensor the block
keeps, a computed weight kept beside its parameters), and a clean model retains none."""

import logging

import torch
from torch import nn

import fastvideo_offload as fo
from support.models import Block, TinyDiT


class FusedQKV(nn.Module):
    """q, k and v parameters are views of one fused tensor that the block also keeps."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.fused = torch.randn(3 * dim, dim)
        self.q, self.k, self.v = (nn.Parameter(t) for t in self.fused.chunk(3))
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        return self.out(torch.softmax(x @ self.q.T @ (x @ self.k.T).transpose(-1, -2), -1) @ x @ self.v.T)


def run(model_factory, caplog):
    # Built twice from one seed: a legacy weight_norm module cannot be deep-copied.
    torch.manual_seed(0)
    model = model_factory()
    torch.manual_seed(0)
    reference = model_factory()
    with caplog.at_level(logging.WARNING, logger="fastvideo_offload"):
        handle = fo.enable(model, device="cpu")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    return model, handle


class Stack(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.blocks = nn.ModuleList(make() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_a_fused_tensor_the_block_keeps_is_reported(caplog):
    model, handle = run(lambda: Stack(FusedQKV), caplog)
    fused = 3 * 32 * 32 * 4
    assert handle.stats()["retained_bytes"] == 3 * fused
    assert ("offloading leaves 0.04 MiB of the blocks' memory where it was: blocks.0.fused keeps the storage of "
            "blocks.0.q and others (0.01 MiB)") in caplog.text


def test_a_computed_weight_kept_beside_its_parameters_is_reported(caplog):
    def block():
        b = Block(32)
        torch.nn.utils.weight_norm(b.proj)  # the legacy hook-based form keeps `proj.weight`
        return b

    model, handle = run(lambda: Stack(block), caplog)
    assert handle.stats()["retained_bytes"] == 3 * 32 * 32 * 4
    assert "blocks.0.proj.weight is a tensor the block keeps beside its parameters, never offloaded" in caplog.text


def test_a_view_of_a_weight_held_outside_the_model_is_reported(caplog):
    model = Stack(lambda: Block(32))
    outside = model.blocks[1].qkv.weight.data[:4]  # a user's handle on one block's weight
    with caplog.at_level(logging.WARNING, logger="fastvideo_offload"):
        handle = fo.enable(model, device="cpu")
    assert handle.stats()["retained_bytes"] == outside.untyped_storage().nbytes() == 3 * 32 * 32 * 4
    assert "the storage of blocks.1.qkv.weight is referenced outside the model's parameters" in caplog.text


def test_a_plain_model_retains_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="fastvideo_offload"):
        handle = fo.enable(TinyDiT(), device="cpu")
    assert handle.stats()["retained_bytes"] == 0
    assert "where it was" not in caplog.text
