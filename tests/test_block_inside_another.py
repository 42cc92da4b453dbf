"""An offloaded block that runs another one inside its forward: neither the inner block's copy nor
its prefetches take the outer one's slot, with and without a device budget."""

import copy

import pytest
import torch

import fastvideo_offload as fo
from support.models import CallsInside, tiny_input
from support.offloaded import is_placeholder, run_passes


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
