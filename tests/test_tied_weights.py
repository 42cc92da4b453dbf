"""Weights tied under offload: shared by two blocks (kept resident), or by two submodules of one
block (offloaded once, saved under both names)."""

import copy

import torch

import fastvideo_offload as fo
from fastvideo_offload.store import BlockStore
from support.models import ListOf, TiedBlocks, TiedInsideBlock, TinyDiT, tiny_input
from support.offloaded import assert_same_outputs, is_placeholder, run_passes


def test_parameter_shared_by_two_blocks_stays_resident():
    inputs = [tiny_input() for _ in range(3)]
    model, _ = assert_same_outputs(lambda: TiedBlocks(), inputs)
    # shared weights keep their data; unshared block weights hold placeholders
    assert model.blocks[0].proj.weight.numel() == 16 * 16
    assert model.blocks[1].proj.weight.numel() == 16 * 16
    assert is_placeholder(model.blocks[0].qkv.weight)
    assert model.blocks[0].proj.weight is model.blocks[2].proj.weight



def test_a_weight_tied_between_blocks_1_and_10_stays_resident():
    """blocks.1 is a prefix of blocks.10's name, but not of its path: the tied weight belongs to
    neither block alone."""
    reference = TinyDiT(layers=11)
    reference.blocks[10].proj.weight = reference.blocks[1].proj.weight
    model = copy.deepcopy(reference)
    sizes = [BlockStore.nbytes(list(b.parameters())) for b in model.blocks]
    shared = model.blocks[1].proj.weight
    without = [BlockStore.nbytes([p for p in b.parameters() if p is not shared]) for b in model.blocks]
    handle = fo.enable(model, device="cpu")
    assert model.blocks[1].proj.weight is model.blocks[10].proj.weight and shared.shape == (32, 32)
    assert is_placeholder(model.blocks[1].qkv.weight) and is_placeholder(model.blocks[10].qkv.weight)
    assert handle.stats()["host_bytes"] == sum(without) < sum(sizes)
    inputs = [tiny_input() for _ in range(3)]
    for e, g in zip(run_passes(reference, inputs), run_passes(model, inputs)):
        assert torch.equal(e, g)



def test_a_weight_tied_inside_one_block_is_offloaded_and_saved_under_both_names():
    """Tied between two submodules of one block, the weight is offloaded with it, once; state_dict
    holds it under both names, and load_state_dict through either name reaches the next forward."""
    reference = ListOf([TiedInsideBlock() for _ in range(3)])
    model = copy.deepcopy(reference)
    expected = {k: v.clone() for k, v in reference.state_dict().items()}
    assert "layers.1.up.weight" in expected and "layers.1.down.weight" in expected
    handle = fo.enable(model, device="cpu", blocks=["layers"])
    block = model.layers[1]
    assert block.up.weight is block.down.weight and is_placeholder(block.up.weight)
    assert handle.stats()["host_bytes"] == sum(BlockStore.nbytes(list(b.parameters())) for b in reference.layers)
    inputs = [tiny_input() for _ in range(2)]
    assert all(torch.equal(e, g) for e, g in zip(run_passes(reference, inputs), run_passes(model, inputs)))
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    torch.manual_seed(1)
    other = ListOf([TiedInsideBlock() for _ in range(3)])
    result = model.load_state_dict(other.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in other.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert all(torch.equal(e, g) for e, g in zip(run_passes(other, inputs), run_passes(model, inputs)))
    handle.disable()
    assert model.layers[1].up.weight is model.layers[1].down.weight
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
