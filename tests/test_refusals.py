"""What enable, disable and an offloaded model refuse, by name: a second enable, a bad argument, a
block list it cannot use, disable inside a forward, backward into offloaded weights."""

import copy

import pytest
import torch
from torch import nn

import fastvideo_offload as fo
from support.models import TinyDiT, tiny_input
from support.offloaded import is_placeholder, run_passes


def test_enabling_twice_is_refused():
    model = TinyDiT()
    fo.enable(model, device="cpu")
    with pytest.raises(RuntimeError, match="already enabled"):
        fo.enable(model, device="cpu")



def test_disable_without_enable_is_refused():
    with pytest.raises(RuntimeError, match="not enabled"):
        fo.disable(TinyDiT())



def test_model_without_block_list():
    with pytest.raises(ValueError, match="no nn.ModuleList of transformer blocks"):
        fo.enable(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), device="cpu")



def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        fo.enable("model", device="cpu")



def test_meta_parameters():
    with torch.device("meta"):
        model = TinyDiT()
    with pytest.raises(ValueError, match="meta device"):
        fo.enable(model, device="cpu")
    assert fo.handle_of(model) is None



@pytest.mark.parametrize("device", ["cuda:7", "npu", "not-a-device", 3.5])
def test_device_that_does_not_exist(device):
    if torch.cuda.is_available() and device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(ValueError, match="device"):
        fo.enable(TinyDiT(), device=device)



@pytest.mark.parametrize("prefetch, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_prefetch(prefetch, error):
    with pytest.raises(error, match="prefetch"):
        fo.enable(TinyDiT(), device="cpu", prefetch=prefetch)



@pytest.mark.parametrize(
    "blocks, error, match",
    [
        (["nope"], ValueError, "no submodule 'nope'"),
        (["head"], TypeError, "not an nn.ModuleList"),
        ("blocks", TypeError, "list of attribute paths"),
        ([], ValueError, "empty"),
    ],
)
def test_bad_block_paths(blocks, error, match):
    with pytest.raises(error, match=match):
        fo.enable(TinyDiT(), device="cpu", blocks=blocks)



def test_block_registered_outside_its_list():
    model = TinyDiT()
    model.first = model.blocks[0]
    with pytest.raises(ValueError, match="also registered as first"):
        fo.enable(model, device="cpu")
    assert all(not is_placeholder(p) for p in model.parameters())



def test_disable_during_forward_is_refused():
    model = TinyDiT()
    handle = fo.enable(model, device="cpu")
    errors = []

    def probe(block):
        with pytest.raises(RuntimeError, match="running") as info:
            handle.disable()
        errors.append(info)

    model.blocks[1].probe = probe
    run_passes(model, [tiny_input()])
    assert len(errors) == 1 and handle.enabled



def test_backward_into_offloaded_weights_is_refused_by_name():
    """A forward under grad mode (no_grad forgotten) still works; a backward that would need
    gradients for offloaded weights (a full fine-tune) raises naming the block, a parameter and what
    to do, before any gradient reaches a weight that lives in host memory. (Frozen weights train:
    tests/test_training.py.)"""
    model = TinyDiT()
    reference = copy.deepcopy(model)
    x = tiny_input()
    handle = fo.enable(model, device="cpu")
    y = model(x)
    assert torch.equal(y, reference(x))
    with pytest.raises(RuntimeError, match=r"^fastvideo_offload: block blocks\.3: 10 of its offloaded parameters "
                       r"require grad \(for example blocks\.3\.norm\.weight\).*model\.requires_grad_\(False\)"):
        y.sum().backward()
    assert all(p.grad is None for p in model.blocks.parameters())
    assert handle.stats()["held_blocks"] == 0
    assert torch.equal(run_passes(model, [x])[0], run_passes(reference, [x])[0])
    handle.disable()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
