"""Offload under torch.autocast: the casts autocast caches for a block's weights die with the block,
so no copy of the blocks is kept and a change of the weights is seen."""

import copy
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastvideo_offload as fo
from support.models import TinyDiT, tiny_input


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
