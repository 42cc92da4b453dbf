"""device_budget: the planner's choices, and an offloaded model that keeps exactly the planned
blocks resident, copies exactly the streamed ones, and never holds more than the budget."""

import copy
import itertools
import random

import pytest
import torch

import fastvideo_offload as fo
from fastvideo_offload.planner import plan, spread
from fastvideo_offload import _ops
from support.models import TinyDiT, TwoListDiT, tiny_input
from support.snapshot import assert_unchanged, snapshot


def test_everything_resident_when_it_fits():
    p = plan([10] * 8, 80, slots=2)
    assert p.resident == tuple(range(8)) and p.streamed == () and p.device_bytes == 80 and p.streamed_bytes == 0


def test_streamed_blocks_are_spread_through_the_order():
    p = plan([10] * 8, 50, slots=2)
    # 3 resident + a ring of 2: 5 blocks stream, never the last 5 back to back.
    assert p.streamed == (0, 2, 4, 5, 7) and p.resident == (1, 3, 6) and p.device_bytes == 50
    assert spread(12, 3) == [2, 6, 10]
    assert plan([10] * 8, 20, slots=2).streamed == tuple(range(8))


def _need(sizes, streamed, slots):
    """The device bytes of keeping every block but `streamed`: them, and a ring of as many slots as
    can fill (no more than the streamed blocks), each as large as the largest streamed block."""
    ring = min(slots, len(streamed)) * max((sizes[i] for i in streamed), default=0)
    return sum(s for i, s in enumerate(sizes) if i not in streamed) + ring


def test_the_plan_never_exceeds_the_budget_and_keeps_the_most_it_can():
    """Computed independently of the planner: within the budget; no plan streaming one block fewer
    (spread alike) fits; for blocks of one size (a DiT's), no choice of blocks at all keeps more."""
    rng = random.Random(0)
    for case in range(600):
        n = rng.randint(1, 10)
        uniform = case % 2 == 0
        size = rng.randint(1, 100)
        sizes = [size if uniform else rng.randint(1, 100) for _ in range(n)]
        slots = rng.randint(1, 3)
        budget = rng.randint(0, sum(sizes) + 100)
        try:
            p = plan(sizes, budget, slots)
        except ValueError:
            assert _need(sizes, set(range(n)), slots) > budget  # not even streaming all of them fits
            continue
        assert sorted(p.resident + p.streamed) == list(range(n))
        assert p.streamed == tuple(spread(n, len(p.streamed)))
        assert p.device_bytes == _need(sizes, set(p.streamed), slots) <= budget
        assert p.streamed_bytes == sum(sizes[i] for i in p.streamed)
        if p.streamed:
            assert _need(sizes, set(spread(n, len(p.streamed) - 1)), slots) > budget
        if uniform:
            best = max(n - k for k in range(n + 1) for streamed in itertools.combinations(range(n), k)
                       if _need(sizes, set(streamed), slots) <= budget)
            assert len(p.resident) == best, (sizes, budget, slots, p)


def test_a_budget_below_the_ring_is_refused():
    with pytest.raises(ValueError, match=r"device_budget: 19 bytes for the blocks is less than streaming needs: "
                                         r"2 slot\(s\) of the largest block, 20 bytes"):
        plan([10] * 8, 19, slots=2)


def block_bytes(handle):
    return handle.stats()["host_bytes"] // handle.stats()["blocks"]  # TinyDiT's blocks are all one size


def fixed_bytes(model):
    """What stays on the device: the weights outside the blocks, and every buffer."""
    params = [p for name, p in model.named_parameters() if not name.startswith("blocks.")]
    return sum(t.numel() * t.element_size() for t in params + list(model.buffers()))


def enable_with_budget(resident: int, layers: int = 8, prefetch: int = 1):
    """TinyDiT under a budget that holds `resident` blocks besides the ring and the other weights."""
    model = TinyDiT(layers=layers)
    reference = copy.deepcopy(model)
    probe = fo.enable(copy.deepcopy(model), device="cpu")
    block = block_bytes(probe)
    budget = fixed_bytes(model) + (resident + prefetch + 1) * block
    handle = fo.enable(model, device="cpu", prefetch=prefetch, device_budget=budget)
    return model, reference, handle, budget, block


@pytest.mark.parametrize("resident", [0, 3, 5])
def test_resident_blocks_are_copied_once_and_streamed_ones_every_step(resident):
    model, reference, handle, budget, block = enable_with_budget(resident)
    stats = handle.stats()
    assert (stats["resident_blocks"], stats["streamed_blocks"]) == (resident, 8 - resident)
    assert stats["resident_bytes"] == resident * block
    seen = []

    def inside(b):  # the bound, from inside every block's forward
        seen.append(handle.stats()["device_bytes"])
        assert fixed_bytes(reference) + handle.stats()["device_bytes"] <= budget

    for b in model.blocks:
        b.probe = inside
    with torch.no_grad():
        for step in range(3):
            x = tiny_input()
            assert torch.equal(model(x), reference(x))
            copied = handle.stats()["forward_h2d_bytes"]
            if step == 0:
                # Every block once, the resident ones included, and the next step's first streamed block.
                assert copied == 9 * block
            else:
                assert copied == (8 - resident) * block  # only the streamed ones
    assert len(seen) == 24 and max(seen) == (resident + 2) * block


def test_the_plan_follows_the_order_the_blocks_run_in():
    """TwoListDiT registers its 2 single blocks before its 3 double blocks and runs them after:
    planned in registration order at enable, re-planned in the order the engine saw from the
    second forward on. Either way the streamed blocks are spread through the order planned in."""
    torch.manual_seed(0)
    model = TwoListDiT().eval()
    reference = copy.deepcopy(model)
    block = block_bytes(fo.enable(copy.deepcopy(model), device="cpu"))
    outside = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "blocks." not in n)
    handle = fo.enable(model, device="cpu", device_budget=outside + (2 + 2) * block)  # 2 resident, a ring of 2
    registered = spread(5, 3)  # positions 0, 2, 4
    assert handle._budget.plan.streamed == tuple(registered)
    with torch.no_grad():
        for step in range(3):
            x = tiny_input()
            assert torch.equal(model(x), reference(x))
            if step == 2:  # planned in the order seen: copies only the streamed ones
                assert handle.stats()["forward_h2d_bytes"] == 3 * block
    ran = [2, 3, 4, 0, 1]  # double blocks (registered 2-4), then single blocks (0-1)
    assert _ops.engine_order(handle._engine) == ran
    assert handle._budget.plan.streamed == tuple(ran[i] for i in registered)
    assert sorted(handle._budget.plan.resident) == [0, 3]
    assert handle.stats()["resident_blocks"] == 2


def test_everything_resident_copies_nothing_after_the_first_step():
    model, reference, handle, budget, block = enable_with_budget(8, prefetch=1)
    # 8 resident blocks and a ring of 2 are more than 8 blocks alone: all resident, no ring at all.
    assert handle.stats()["resident_blocks"] == 8
    with torch.no_grad():
        for step in range(3):
            x = tiny_input()
            assert torch.equal(model(x), reference(x))
            assert handle.stats()["forward_h2d_bytes"] == (8 * block if step == 0 else 0)
    assert handle.stats()["device_bytes"] == 8 * block


def test_a_budget_below_one_block_and_the_ring_is_refused_and_changes_nothing():
    model = TinyDiT(layers=8)
    before = snapshot(model)
    budget = fixed_bytes(model) + 100
    with pytest.raises(ValueError, match=r"device_budget: 100 bytes for the blocks is less than streaming needs"):
        fo.enable(model, device="cpu", device_budget=budget)
    assert_unchanged(model, before)
    assert fo.handle_of(model) is None


def test_the_budget_changes_between_forwards():
    model, reference, handle, budget, block = enable_with_budget(0)
    with torch.no_grad():
        x = tiny_input()
        assert torch.equal(model(x), reference(x))
        handle.set_device_budget(budget + 4 * block)
        assert handle.stats()["resident_blocks"] == 4
        for _ in range(2):
            assert torch.equal(model(x), reference(x))
        assert handle.stats()["forward_h2d_bytes"] == 4 * block
        with pytest.raises(ValueError, match=r"device_budget: 100 bytes do not hold what stays on the device \(2336 "
                                             r"bytes of non-block weights and buffers"):
            handle.set_device_budget(100)
        assert handle.stats()["resident_blocks"] == 4  # the old plan stays
        assert torch.equal(model(x), reference(x))


def test_a_re_plan_copies_only_what_changed():
    """Re-planning keeps the slots of the blocks that stay resident: the same budget again copies
    nothing more than a step streams, and a larger one copies only the blocks it makes resident."""
    model, reference, handle, budget, block = enable_with_budget(3)
    x = tiny_input()
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(x), reference(x))
        assert handle.stats()["forward_h2d_bytes"] == 5 * block  # the 5 streamed blocks
        handle.set_device_budget(budget)
        assert torch.equal(model(x), reference(x))
        assert handle.stats()["forward_h2d_bytes"] == 5 * block
        before = set(handle._budget.plan.resident)
        handle.set_device_budget(budget + 2 * block)
        after = set(handle._budget.plan.resident)
        assert len(after) == 5 and len(after & before) >= 1
        assert torch.equal(model(x), reference(x))
        # The 3 streamed blocks and each newly resident block once; and when the step before
        # prefetched another block than the first one streamed now, that one again for the next step.
        crossing = min(set(range(8)) - after) != min(set(range(8)) - before)
        assert handle.stats()["forward_h2d_bytes"] == (3 + len(after - before) + crossing) * block
        assert torch.equal(model(x), reference(x))
        assert handle.stats()["forward_h2d_bytes"] == 3 * block
        handle.set_device_budget(budget)  # back: the blocks that stream again give their slots back
        assert torch.equal(model(x), reference(x))
        assert handle.stats()["device_bytes"] == (3 + 2) * block
        assert torch.equal(model(x), reference(x))
        assert handle.stats()["forward_h2d_bytes"] == 5 * block


def test_bad_budgets_are_refused():
    for bad in (-1, 2**63):
        with pytest.raises(ValueError, match=r"device_budget must be a byte count in \[0, 2\*\*63\), 'auto' or None"):
            fo.enable(TinyDiT(), device="cpu", device_budget=bad)
    for bad in (1.5, True, "lots"):  # the same rule as host_pin_budget's: a wrong type is a TypeError
        with pytest.raises(TypeError, match="device_budget must be a byte count, 'auto' or None, got"):
            fo.enable(TinyDiT(), device="cpu", device_budget=bad)
        with pytest.raises(TypeError, match="host_pin_budget must be a byte count, 'auto' or None, got"):
            fo.enable(TinyDiT(), device="cpu", host_pin_budget=bad)
    with pytest.raises(ValueError, match="device_budget='auto' reads free CUDA memory"):
        fo.enable(TinyDiT(), device="cpu", device_budget="auto")
    with pytest.raises(RuntimeError, match="enabled without device_budget"):
        fo.enable(TinyDiT(), device="cpu").set_device_budget(10)
    handle = fo.enable(TinyDiT(), device="cpu", device_budget=10**9)
    with pytest.raises(TypeError, match="set_device_budget must be a byte count, got 'auto'"):
        handle.set_device_budget("auto")  # a new budget is a number: "auto" is read once, at enable


def test_experts_of_a_group_take_turns_holding_their_resident_blocks():
    _, _, probe, budget, block = enable_with_budget(4)
    probe.disable()
    models = [TinyDiT(layers=8) for _ in range(2)]
    references = [copy.deepcopy(m) for m in models]
    handles = [fo.enable(m, device="cpu", group="wan22", device_budget=budget) for m in models]
    assert [h.stats()["resident_blocks"] for h in handles] == [4, 4]
    with torch.no_grad():
        for step in range(4):
            active = step // 2  # the high-noise expert for two steps, then the low-noise one
            x = tiny_input()
            assert torch.equal(models[active](x), references[active](x))
            assert handles[1 - active].stats()["device_bytes"] == 0  # the idle expert holds nothing
            # The switch costs the resident blocks once (all 8, and the next step's first streamed
            # block); then 4 streamed blocks a step.
            assert handles[active].stats()["forward_h2d_bytes"] == (9 if step % 2 == 0 else 4) * block


def test_a_forward_that_needs_more_activation_memory_shrinks_residency(caplog):
    """On CUDA each forward's activation peak is measured; the re-plan that follows is this (the
    measurement itself needs a GPU)."""
    model, reference, handle, budget, block = enable_with_budget(5)
    x = tiny_input()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        handle._budget.observe(2 * block)  # a larger resolution needed two blocks' worth
        assert handle.stats()["resident_blocks"] == 3
        handle._budget.observe(block)  # less than already planned for: nothing changes
        assert handle.stats()["resident_blocks"] == 3
        for _ in range(2):
            assert torch.equal(model(x), reference(x))
        assert handle.stats()["forward_h2d_bytes"] == 5 * block
        handle._budget.observe(100 * block)  # no plan fits: the old one stays, with a warning
        assert handle.stats()["resident_blocks"] == 3
        assert "leave no room to plan in" in caplog.text
        assert torch.equal(model(x), reference(x))
