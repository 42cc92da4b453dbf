"""enable() on CPU: the whole engine but streams and pinned memory, against the same model
without offload."""

import contextlib
import copy
import io
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastvideo_offload as fo
from fastvideo_offload.store import BlockStore
from support.models import (
    CallsInside,
    Interleaved,
    ListOf,
    MixedModel,
    Nested,
    TiedBlocks,
    TiedInsideBlock,
    TinyDiT,
    TwoListDiT,
    WithEmptyBlock,
    tiny_input,
)


def is_placeholder(p: torch.Tensor) -> bool:
    return p.numel() == 0 and p.dim() == 1


def run_passes(model, inputs):
    with torch.no_grad():
        return [model(x) for x in inputs]


def assert_same_outputs(make_model, inputs, **enable_kwargs):
    reference = make_model()
    offloaded = copy.deepcopy(reference)
    expected = run_passes(reference, inputs)
    handle = fo.enable(offloaded, device="cpu", **enable_kwargs)
    got = run_passes(offloaded, inputs)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    return offloaded, handle


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefetch", [0, 1, 2, 7])
def test_outputs_bit_identical(dtype, prefetch):
    inputs = [tiny_input(dtype=dtype) for _ in range(4)]
    model, handle = assert_same_outputs(lambda: TinyDiT(dtype=dtype), inputs, prefetch=prefetch)
    stats = handle.stats()
    assert stats["blocks"] == 4
    assert stats["enters"] == 16
    assert stats["max_resident_blocks"] <= 1 + prefetch
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
        seen.append(fo.handle_of(model).stats()["max_resident_blocks"])

    for b in model.blocks:
        b.probe = probe
    run_passes(model, [tiny_input() for _ in range(2)])
    assert len(seen) == 12
    assert max(seen) == 1 + prefetch
    # outside the forward every block parameter is a placeholder; shapes come from state_dict
    assert all(is_placeholder(p) for p in model.blocks.parameters())
    assert model.embed.weight.shape == (32, 8)


def _check_inside(model, reference, outer: int, inner: int) -> list[bool]:
    """From inside the inner block's forward, when it runs inside the outer one's: whether both
    hold their own weights (the outer one's slot not taken by the inner one's copy or by a
    prefetch it started). One entry per nested call."""
    real = {i: [p.detach().clone() for p in reference.blocks[i].parameters()] for i in (outer, inner)}
    inside, checks = [], []
    # Registered after offload's hooks: they see the outer block entered, and not yet left.
    model.blocks[outer].register_forward_pre_hook(lambda m, a: inside.append(True))
    model.blocks[outer].register_forward_hook(lambda m, a, o: inside.clear())

    def probe(block):
        if inside:
            checks.append(all(torch.equal(p, r) for i in (outer, inner)
                              for p, r in zip(model.blocks[i].parameters(), real[i], strict=True)))

    model.blocks[inner].probe = probe
    return checks


@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("outer, inner", [(1, 2), (2, 1), (1, 4), (4, 1), (3, 0), (0, 5)])
def test_a_block_run_inside_another_never_takes_its_slot(prefetch, outer, inner):
    """An offloaded block that calls another one inside its forward, adjacent or not: neither the
    inner block's copy nor the prefetches it starts may take the slot the outer one still runs from."""
    reference = CallsInside(outer, inner)
    model = copy.deepcopy(reference)
    handle = fo.enable(model, device="cpu", prefetch=prefetch)
    checks = _check_inside(model, reference, outer, inner)
    inputs = [tiny_input() for _ in range(3)]
    for e, g in zip(run_passes(reference, inputs), run_passes(model, inputs)):
        assert torch.equal(e, g)
    assert checks == [True] * len(inputs)
    stats = handle.stats()
    assert stats["max_materialized_blocks"] == 2 and stats["enters"] == 7 * len(inputs)
    assert all(is_placeholder(p) for p in model.blocks.parameters())


@pytest.mark.parametrize("outer, inner, resident", [(1, 5, 1), (3, 0, 2)])
def test_a_block_run_inside_another_under_a_device_budget(outer, inner, resident):
    """With resident blocks beside a ring of two slots, the ring's free slot may hold a block that
    the inner one's lookahead names: the inner block takes it (that block is copied again when it
    runs) rather than being refused as if every slot held a running block."""
    reference = CallsInside(outer, inner)
    model = copy.deepcopy(reference)
    fixed, sizes = fo.offloader.footprint(model)
    handle = fo.enable(model, device="cpu", prefetch=1, device_budget=fixed + (2 + resident) * max(sizes))
    assert handle.stats()["resident_blocks"] == resident
    checks = _check_inside(model, reference, outer, inner)
    inputs = [tiny_input() for _ in range(3)]
    for e, g in zip(run_passes(reference, inputs), run_passes(model, inputs)):
        assert torch.equal(e, g)
    assert checks == [True] * len(inputs)


def test_a_block_run_inside_another_needs_a_second_slot():
    """prefetch 0 gives one streaming slot, which the outer block holds: the inner one is refused by
    name, and the model is left as it was."""
    reference = CallsInside(1, 3)
    model = copy.deepcopy(reference)
    handle = fo.enable(model, device="cpu", prefetch=0)
    x = tiny_input()
    with pytest.raises(RuntimeError, match=r"all 1 streaming device slots \(prefetch \+ 1\) hold running blocks; "
                                           r"block 3 cannot run inside another offloaded block: raise prefetch"):
        run_passes(model, [x])
    assert all(is_placeholder(p) for p in model.blocks.parameters())
    handle.disable()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert torch.equal(run_passes(model, [x])[0], run_passes(reference, [x])[0])


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


def test_state_dict_under_offload_holds_real_weights():
    model = TinyDiT()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fo.enable(model, device="cpu")
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # a checkpoint saved under offload loads into a fresh model bit-exact
    blob = io.BytesIO()
    torch.save(model.state_dict(), blob)
    blob.seek(0)
    fresh = TinyDiT()
    fresh.load_state_dict(torch.load(blob))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_load_state_dict_under_offload_reaches_next_forward():
    model = TinyDiT()
    other = TinyDiT()
    x = tiny_input()
    fo.enable(model, device="cpu", prefetch=2)
    run_passes(model, [x])  # fill the device slots with the old weights
    result = model.load_state_dict(other.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(run_passes(model, [x])[0], run_passes(other, [x])[0])
    for k, v in other.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_load_state_dict_reports_missing_and_mismatched_keys():
    model = TinyDiT()
    fo.enable(model, device="cpu")
    partial = {k: v for k, v in TinyDiT().state_dict().items() if k != "blocks.1.qkv.weight"}
    result = model.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["blocks.1.qkv.weight"]
    wrong = dict(partial, **{"blocks.0.proj.weight": torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match=r"size mismatch for blocks\.0\.proj\.weight"):
        model.load_state_dict(wrong)


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


# ---- errors ----


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
    assert stats["device_slots"] == 4 and stats["max_resident_blocks"] == 4


def test_explicit_block_paths():
    model = TwoListDiT()
    handle = fo.enable(model, device="cpu", blocks=["double_blocks"])
    assert handle.stats()["blocks"] == 3
    assert is_placeholder(model.double_blocks[0].qkv.weight)
    assert not is_placeholder(model.single_blocks[0].qkv.weight)


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


# ---- changing weights under offload ----


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


class _Casts(TorchDispatchMode):
    """Counts autocast's casts to bfloat16 (each is an aten._to_copy below autocast)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.count += func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16
        return func(*args, **kwargs)


def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_autocast_keeps_no_copy_of_the_blocks_and_sees_changes(prefetch):
    """autocast caches the bf16 copy of an fp32 parameter that requires grad for its whole region,
    keyed by the parameter: under offload it would keep every block's weights and go on using
    them after a change. The post-hooks drop those copies with the block."""
    model = TinyDiT()
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cpu", prefetch=prefetch)
    x = tiny_input()
    with torch.no_grad(), _bf16_autocast():
        with _Casts() as first:
            expected = reference(x)
            assert torch.equal(model(x), expected)
        for _ in range(2):
            with _Casts() as again:
                assert torch.equal(model(x), expected)
            # Every weight cast anew: no copy of any block outlived the forward that made it.
            assert 2 * again.count == first.count
        with handle.mutate(model.blocks[1]):
            model.blocks[1].proj.weight.mul_(-1)
        changed = model(x)
    with torch.no_grad():
        reference.blocks[1].proj.weight.mul_(-1)
    with torch.no_grad(), _bf16_autocast():
        # A fresh region for the reference: its own cache would hold the old weight.
        assert torch.equal(changed, reference(x)) and not torch.equal(changed, expected)


class _CastRefs(TorchDispatchMode):
    """Weak references to autocast's bf16 copies of parameters (a parameter requires grad, an
    activation under no_grad does not), filed under the block running when each was made."""

    def __init__(self):
        super().__init__()
        self.block = None
        self.refs: dict[int | None, list[weakref.ref]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16 and args[0].requires_grad:
            self.refs.setdefault(self.block, []).append(weakref.ref(out))
        return out

    def alive(self, block) -> int:
        return sum(ref() is not None for ref in self.refs.get(block, []))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_autocast_copies_of_a_block_die_with_it(prefetch):
    """Seen from inside each block: the bf16 copies autocast cached for the blocks before it are
    gone (each post-hook drops its block's), not kept to the end of the forward, while the running
    block's own copies are alive until its post-hook."""
    model = TinyDiT()
    reference = copy.deepcopy(model)
    fo.enable(model, device="cpu", prefetch=prefetch)
    casts, seen, own = _CastRefs(), [], []
    weights = sum(1 for _ in model.blocks[0].parameters()) - 2  # all but the LayerNorm's, which stays fp32

    def leaving(i):
        own.append(casts.alive(i))
        casts.block = None  # the head's copies are no block's

    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: setattr(casts, "block", i))
        # Prepended: runs before offload's post-hook, which drops the copies.
        block.register_forward_hook(lambda m, a, o, i=i: leaving(i), prepend=True)
        block.probe = lambda b, i=i: seen.append([casts.alive(j) for j in range(i)])
    x = tiny_input()
    with torch.no_grad(), _bf16_autocast(), casts:
        got = model(x)
    with torch.no_grad(), _bf16_autocast():
        assert torch.equal(got, reference(x))
    assert own == [weights] * len(model.blocks)
    assert all(len(casts.refs[i]) == weights for i in range(len(model.blocks)))
    assert seen == [[0] * i for i in range(len(model.blocks))]


def test_autocast_copy_made_outside_a_block_is_not_used():
    """A cast made while `mutate` held real weights (or left by an interrupted block) is dropped
    when the next forward starts."""
    model = TinyDiT()
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cpu")
    x = tiny_input()
    with torch.no_grad(), _bf16_autocast():
        with handle.mutate(model.blocks[0]):
            model.blocks[0].proj(torch.zeros(1, 32))  # caches a bf16 copy of the old weight
            model.blocks[0].proj.weight.zero_()
        got = model(x)
    with torch.no_grad():
        reference.blocks[0].proj.weight.zero_()
    with torch.no_grad(), _bf16_autocast():
        assert torch.equal(got, reference(x))


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


@pytest.mark.parametrize("frozen", [False, True])
def test_backward_through_offloaded_blocks_is_refused_by_name(frozen):
    """A forward under grad mode (no_grad forgotten) still works; backward, needed for the weights'
    gradients or, with frozen weights, for the input's, raises naming offload before any block's
    backward runs on weights that are gone."""
    model = TinyDiT()
    model.requires_grad_(not frozen)
    reference = copy.deepcopy(model)
    x = tiny_input().requires_grad_(frozen)
    handle = fo.enable(model, device="cpu")
    y = model(x)
    assert torch.equal(y, reference(x))
    with pytest.raises(RuntimeError, match=r"^fastvideo_offload: backward through offloaded blocks is not supported "
                       r"\(inference only\)"):
        y.sum().backward()
    assert all(p.grad is None for p in model.blocks.parameters())
    assert torch.equal(run_passes(model, [x])[0], run_passes(reference, [x])[0])
    handle.disable()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_group_members_take_turns_on_the_device():
    a, b = TinyDiT(), TinyDiT()
    ha = fo.enable(a, device="cpu", group="pair")
    fo.enable(b, device="cpu", group="pair")
    solo = TinyDiT()
    hs = fo.enable(solo, device="cpu")
    run_passes(a, [tiny_input()])
    run_passes(solo, [tiny_input()])
    assert ha.stats()["device_bytes"] > 0
    run_passes(b, [tiny_input()])
    assert ha.stats()["device_bytes"] == 0  # a gave its slots back when b started
    assert hs.stats()["device_bytes"] > 0  # not in the group
    with pytest.raises(TypeError, match="group"):
        fo.enable(TinyDiT(), device="cpu", group=3)


def test_a_compiled_model_runs_offloaded_and_exact():
    """The whole model compiled: the model's and the blocks' hooks stay eager (disabled for the
    compiler), so every block is still entered and left, and outputs match the resident model's."""
    torch._dynamo.reset()
    model = TinyDiT()
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cpu", prefetch=1)
    model.compile(backend="eager")
    inputs = [tiny_input() for _ in range(3)]
    for got, expected in zip(run_passes(model, inputs), run_passes(reference, inputs)):
        assert torch.equal(got, expected)
    assert handle.stats()["enters"] == 12 and handle.stats()["running_blocks"] == 0
    torch._dynamo.reset()


def test_compiled_blocks_run_offloaded_without_recompiling():
    """FastVideo compiles each block (regional compile): the hooks stay eager, the compiled block
    takes the swapped-in weights as inputs, and new slots do not trigger recompiles."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = TinyDiT()
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cpu", prefetch=1)
    for block in model.blocks:
        block.compile(backend="aot_eager")
    inputs = [tiny_input() for _ in range(5)]
    for got, expected in zip(run_passes(model, inputs), run_passes(reference, inputs)):
        assert torch.equal(got, expected)
    assert handle.stats()["enters"] == 20
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    torch._dynamo.reset()
