"""handle.mutate(): weights changed under offload reach the host store, a change that raises or
changes a shape changes nothing, and overlapping strides survive it."""

import contextlib
import copy

import pytest
import torch
from torch import nn

import fastvideo_offload as fo
from support.models import TinyDiT, tiny_input
from support.offloaded import is_placeholder, run_passes


def test_mutate_writes_back_to_the_host_store():
    model = TinyDiT()
    reference = copy.deepcopy(model)
    x = tiny_input()
    handle = fo.enable(model, device="cpu", prefetch=2)
    run_passes(model, [x])  # slots hold the old weights
    with handle.mutate(), torch.no_grad():
        for block in model.blocks:
            block.qkv.weight.mul_(0.5)
    with torch.no_grad():
        for block in reference.blocks:
            block.qkv.weight.mul_(0.5)
    assert all(is_placeholder(p) for p in model.blocks.parameters())
    assert torch.equal(run_passes(model, [x])[0], run_passes(reference, [x])[0])
    handle.disable()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)



def test_mutate_that_raises_changes_nothing():
    model = TinyDiT()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = fo.enable(model, device="cpu")
    with pytest.raises(KeyError):
        with handle.mutate(model.blocks[0]), torch.no_grad():
            model.blocks[0].proj.weight.zero_()
            raise KeyError("half-way")
    assert all(is_placeholder(p) for p in model.blocks.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())



def test_mutate_refuses_shape_changes_and_foreign_blocks():
    model = TinyDiT()
    before = model.blocks[1].proj.weight.detach().clone()
    handle = fo.enable(model, device="cpu")
    with pytest.raises(ValueError, match=r"blocks\.1\.proj\.weight: torch.float32 \(32, 32\) became"):
        with handle.mutate(model.blocks[1]):
            model.blocks[1].proj.weight.data = torch.zeros(2, 2)
    assert torch.equal(model.state_dict()["blocks.1.proj.weight"], before)
    with pytest.raises(ValueError, match="not one of this model's offloaded blocks"):
        with handle.mutate(model.head):
            pass



def _with_overlapping_parameters():
    """TinyDiT with two block weights whose elements share memory: an expanded (stride-0) one and
    a sliding window over 127 floats."""
    torch.manual_seed(0)
    model = TinyDiT()
    model.blocks[1].proj.weight = nn.Parameter(torch.randn(1, 32).expand(32, 32))
    model.blocks[2].qkv.weight = nn.Parameter(torch.randn(127).as_strided((96, 32), (1, 1)))
    return model



def test_overlapping_strides_survive_mutate_and_disable():
    model, reference = _with_overlapping_parameters(), _with_overlapping_parameters()
    x = tiny_input()
    handle = fo.enable(model, device="cpu")
    assert torch.equal(run_passes(model, [x])[0], run_passes(reference, [x])[0])
    for m in (model, reference):
        with handle.mutate() if m is model else contextlib.nullcontext():
            m.blocks[1].proj.weight.data = torch.full((1, 32), 0.5).expand(32, 32)
            assert m.blocks[2].qkv.weight.stride() == (1, 1)
    assert torch.equal(run_passes(model, [x])[0], run_passes(reference, [x])[0])
    with pytest.raises(ValueError, match=r"blocks\.1\.proj\.weight: its strides \(0, 1\) overlap and became \(32, 1\)"):
        with handle.mutate(model.blocks[1]):
            model.blocks[1].proj.weight.data = torch.zeros(32, 32)
    handle.disable()
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        assert p.shape == r.shape and p.stride() == r.stride() and p.dtype == r.dtype and torch.equal(p, r), name
    assert torch.equal(run_passes(model, [x])[0], run_passes(reference, [x])[0])
