"""enable() on CPU: the whole engine but streams and pinned memory, against the same model
without offload: bit-identical outputs, what the host store and the slots hold, the order of the
blocks learned, and disable's round trip."""

import copy

import pytest
import torch
from torch import nn

import fastvideo_offload as fo
from support.models import Interleaved, MixedModel, Nested, TinyDiT, TwoListDiT, WithEmptyBlock, tiny_input
from support.offloaded import assert_same_outputs, is_placeholder, run_passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefetch", [0, 1, 2, 7])
def test_outputs_bit_identical(dtype, prefetch):
    inputs = [tiny_input(dtype=dtype) for _ in range(4)]
    model, handle = assert_same_outputs(lambda: TinyDiT(dtype=dtype), inputs, prefetch=prefetch)
    stats = handle.stats()
    assert stats["blocks"] == 4
    assert stats["enters"] == 16
    assert stats["max_filled_ring_slots"] <= 1 + prefetch
    assert stats["max_materialized_blocks"] == 1



def test_mixed_dtypes_and_strides_in_one_block():
    model = MixedModel()
    reference = copy.deepcopy(model)  # deepcopy makes the gapped weight contiguous; `model` keeps it
    inputs = [torch.randn(2, 5, 16) for _ in range(3)]
    expected = run_passes(reference, inputs)
    block = model.blocks[1]
    layout = [(p.dtype, p.shape, p.stride()) for p in block.parameters()]
    assert block.gapped.stride() == (32, 2) and block.transposed.stride() == (1, 16)
    fo.enable(model, device="cpu")
    seen = []
    # registered after ours, so it runs after the swap
    hook = block.register_forward_pre_hook(
        lambda m, a: seen.append([(p.dtype, p.shape, p.stride()) for p in m.parameters()]))
    got = run_passes(model, inputs)
    hook.remove()
    assert seen[0] == layout
    for e, g in zip(expected, got):
        assert torch.equal(e, g)



def test_block_without_parameters():
    inputs = [torch.randn(3, 16) for _ in range(3)]
    _, handle = assert_same_outputs(WithEmptyBlock, inputs, blocks=["layers"])
    assert handle.stats()["blocks"] == 3



@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_block_whose_parameters_are_all_empty():
    model = nn.Sequential()
    model.blocks = nn.ModuleList(nn.Sequential(nn.Linear(0, 3, bias=False)) for _ in range(2))
    handle = fo.enable(model, device="cpu", blocks=["blocks"])
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(m[0].weight.shape))
    with torch.no_grad():
        out = model.blocks[0](torch.zeros(2, 0))
    assert seen == [torch.Size([3, 0])] and out.shape == (2, 3)
    assert handle.stats()["host_bytes"] == 0 and handle.stats()["blocks"] == 2



def test_two_block_lists_are_both_offloaded():
    inputs = [tiny_input() for _ in range(3)]
    model, handle = assert_same_outputs(TwoListDiT, inputs)
    assert handle.block_paths == ["single_blocks", "double_blocks"]
    stats = handle.stats()
    assert stats["blocks"] == 5 and stats["enters"] == 15
    assert stats["sync_loads"] == 1  # only the very first block waits for its copy



@pytest.mark.parametrize("prefetch", [1, 2])
def test_interleaved_lists_teach_the_engine_their_order(prefetch):
    inputs = [tiny_input() for _ in range(4)]
    model = Interleaved()
    expected = run_passes(copy.deepcopy(model), inputs)
    handle = fo.enable(model, device="cpu", prefetch=prefetch)
    got = run_passes(model, inputs[:2])
    learned = handle.stats()["sync_loads"]
    assert learned > 1  # the registration order was wrong
    got += run_passes(model, inputs[2:])
    # Once the first pass and its wrap into the second were seen, the prefetches follow the order
    # the blocks really run in: no block waits for its copy any more.
    assert handle.stats()["sync_loads"] == learned
    assert all(torch.equal(e, g) for e, g in zip(expected, got))



def test_nested_block_list_is_found():
    inputs = [tiny_input() for _ in range(2)]
    _, handle = assert_same_outputs(Nested, inputs)
    assert handle.block_paths == ["model.blocks"]



def test_residency_from_inside_forward():
    model = TinyDiT(layers=6)
    prefetch = 2
    fo.enable(model, device="cpu", prefetch=prefetch)
    seen = []

    def probe(block):
        materialized = [b for b in model.blocks if not is_placeholder(b.qkv.weight)]
        assert materialized == [block]
        seen.append(fo.handle_of(model).stats()["max_filled_ring_slots"])

    for b in model.blocks:
        b.probe = probe
    run_passes(model, [tiny_input() for _ in range(2)])
    assert len(seen) == 12
    assert max(seen) == 1 + prefetch
    # outside the forward every block parameter is a placeholder; shapes come from state_dict
    assert all(is_placeholder(p) for p in model.blocks.parameters())
    assert model.embed.weight.shape == (32, 8)



def test_exact_host_bytes_and_uploads():
    model = TinyDiT(dim=32, layers=4)
    handle = fo.enable(model, device="cpu", prefetch=1)
    # LayerNorm 2x128 B, qkv 12288 + 384 B, proj 4096 + 128 B, mlp 8192 + 256 + 8192 + 128 B,
    # each at a 256-byte aligned offset.
    offsets = [0, 256, 512, 12800, 13312, 17408, 17664, 25856, 26112, 34304]
    block_bytes = offsets[-1] + 128
    stats = handle.stats()
    assert stats["host_bytes"] == 4 * block_bytes
    assert stats["slot_bytes"] == block_bytes
    run_passes(model, [tiny_input() for _ in range(3)])
    stats = handle.stats()
    # 12 blocks run, each prefetched by the one before; the first is loaded on demand and the
    # last prefetches block 0 of a pass that does not come.
    assert stats["sync_loads"] == 1
    assert stats["uploads"] == 13
    assert stats["prefetches"] == 12
    assert stats["h2d_bytes"] == 13 * block_bytes
    assert stats["device_bytes"] == 2 * block_bytes



def test_prefetch_covering_every_block_copies_each_once():
    model = TinyDiT(layers=3)
    handle = fo.enable(model, device="cpu", prefetch=2)
    run_passes(model, [tiny_input() for _ in range(5)])
    assert handle.stats()["uploads"] == 3



def test_exception_in_block_releases_it():
    model = TinyDiT()
    reference = copy.deepcopy(model)
    fo.enable(model, device="cpu")
    x = tiny_input()

    def boom(block):
        raise RuntimeError("boom")

    model.blocks[2].probe = boom
    with pytest.raises(RuntimeError, match="boom"):
        run_passes(model, [x])
    model.blocks[2].probe = None
    assert all(is_placeholder(p) for p in model.blocks.parameters())
    assert torch.equal(run_passes(model, [x])[0], run_passes(reference, [x])[0])



def test_disable_round_trip_is_bit_exact():
    model = TwoListDiT()
    model.double_blocks[0].proj.weight.requires_grad_(False)
    before = {n: (p, p.detach().clone(), p.stride(), p.requires_grad) for n, p in model.named_parameters()}
    x = tiny_input()
    expected = run_passes(model, [x])[0]
    handle = fo.enable(model, device="cpu")
    run_passes(model, [x, x])
    handle.disable()
    for n, p in model.named_parameters():
        obj, value, stride, grad = before[n]
        assert p is obj and torch.equal(p, value) and p.stride() == stride and p.requires_grad == grad, n
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert fo.handle_of(model) is None
    assert torch.equal(run_passes(model, [x])[0], expected)
    with pytest.raises(RuntimeError, match="already disabled"):
        handle.disable()
    # and it can be enabled again
    fo.enable(model, device="cpu")
    assert torch.equal(run_passes(model, [x])[0], expected)
    fo.disable(model)



def test_parameter_identity_names_and_grad_flags_hold_under_offload():
    model = TinyDiT()
    before = [(n, p, p.requires_grad) for n, p in model.named_parameters()]
    fo.enable(model, device="cpu")
    after = [(n, p, p.requires_grad) for n, p in model.named_parameters()]
    assert [(n, id(p), g) for n, p, g in before] == [(n, id(p), g) for n, p, g in after]



def test_buffers_and_non_block_weights_stay_on_the_device():
    model = TinyDiT()
    fo.enable(model, device="cpu")
    assert model.freqs.numel() == 32 and model.embed.weight.numel() == 32 * 8



@pytest.mark.parametrize("prefetch", [2**31 - 1, 2**32 - 1, 2**63 - 1, 2**100])
def test_a_prefetch_deeper_than_the_blocks_is_cut_to_them(prefetch):
    """No more blocks can be in flight than there are besides the running one: a deeper prefetch
    works as prefetch 3 on 4 blocks, and reserves no more."""
    reference = TinyDiT()
    model = copy.deepcopy(reference)
    handle = fo.enable(model, device="cpu", prefetch=prefetch)
    x = tiny_input()
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(x), reference(x))
    stats = handle.stats()
    assert handle.prefetch == stats["prefetch"] == 3
    assert stats["device_slots"] == 4 and stats["max_filled_ring_slots"] == 4



def test_explicit_block_paths():
    model = TwoListDiT()
    handle = fo.enable(model, device="cpu", blocks=["double_blocks"])
    assert handle.stats()["blocks"] == 3
    assert is_placeholder(model.double_blocks[0].qkv.weight)
    assert not is_placeholder(model.single_blocks[0].qkv.weight)
