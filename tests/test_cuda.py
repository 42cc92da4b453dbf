"""The CUDA path: pinned exact-size host buffers, a copy stream ordered by events, and the
memory bound. Skipped without a GPU; scripts/gpu_check.sh runs them on one."""

import copy
import gc
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import fastvideo_offload as fo
from fastvideo_offload import _ops
from support.models import TinyDiT, tiny_input
from support.snapshot import assert_unchanged, snapshot

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _clean_device():
    """The memory tests count allocated bytes: nothing of an earlier test may be freed during one."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


class Wide(nn.Module):
    """Blocks large enough that one block's copy and the previous block's compute both take
    a measurable time."""

    def __init__(self, dim=2048, layers=6):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) for _ in range(layers)
        )
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _bytes(params):
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_outputs_bit_identical_on_cuda(dtype, prefetch):
    model = TinyDiT(dtype=dtype)
    reference = copy.deepcopy(model).cuda()
    fo.enable(model, device="cuda", prefetch=prefetch)
    with torch.no_grad():
        for _ in range(3):
            x = tiny_input(dtype=dtype).cuda()
            assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("from_checkpoint", [False, True], ids=["pageable", "mapped"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("tokens", [64, 8192])
def test_staged_blocks_exact_under_load(tmp_path, tokens, prefetch, from_checkpoint):
    """Blocks outside a 2-block pin budget reach the GPU through the pinned staging ring, from
    pageable buffers or gathered from a checkpoint's mapped pages: a staging buffer refilled
    before its upload finished, or a block run before its staged bytes landed, shows in the output."""
    accelerate = pytest.importorskip("accelerate")
    from safetensors.torch import save_file

    from fastvideo_offload.store import BlockStore

    model = Wide().half()
    reference = copy.deepcopy(model).cuda()
    budget = 2 * BlockStore.nbytes(list(model.blocks[0].parameters()))
    if from_checkpoint:
        save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
        with accelerate.init_empty_weights():
            model = Wide().half()
        handle = fo.enable(model, device="cuda", prefetch=prefetch, checkpoint=tmp_path / "m.safetensors",
                           host_pin_budget=budget)
    else:
        handle = fo.enable(model, device="cuda", prefetch=prefetch, host_pin_budget=budget)
    stores = handle._stores
    assert [s.staged for s in stores] == [False, False, True, True, True, True]
    assert all(s.buffer.is_pinned() for s in stores[:2]) and not any(s.buffer.is_pinned() for s in stores[2:])
    assert handle.stats()["mapped_bytes"] == (sum(s.size for s in stores[2:]) if from_checkpoint else 0)
    x = 0.5 * torch.randn(tokens, 2048, device="cuda", dtype=torch.half)
    with torch.no_grad():
        expected = reference(x)
        for _ in range(3):
            assert torch.equal(model(x), expected)
    assert handle.stats()["stagings"] >= 3 * 4


@pytest.mark.parametrize("side_stream", [False, True])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("tokens", [64, 8192])
def test_outputs_exact_under_load(tokens, prefetch, side_stream):
    """64 MiB blocks: with few tokens copies outrun compute (a block run before its copy has
    landed reads stale bytes); with many, compute outruns copies (a slot overwritten before its
    block finished corrupts it). Either race shows in the output."""
    model = Wide().half()
    reference = copy.deepcopy(model).cuda()
    fo.enable(model, device="cuda", prefetch=prefetch)
    x = 0.5 * torch.randn(tokens, 2048, device="cuda", dtype=torch.half)
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        expected = reference(x)
        with torch.cuda.stream(stream):
            got = [model(x) for _ in range(3)]
    stream.synchronize()
    assert all(torch.equal(g, expected) for g in got)


def test_side_stream_is_the_compute_stream():
    model = TinyDiT()
    reference = copy.deepcopy(model).cuda()
    fo.enable(model, device="cuda")
    stream = torch.cuda.Stream()
    x = tiny_input().cuda()
    with torch.no_grad(), torch.cuda.stream(stream):
        got = [model(x) for _ in range(3)]
    stream.synchronize()
    with torch.no_grad():
        expected = reference(x)
    assert all(torch.equal(g, expected) for g in got)


def test_host_buffers_are_pinned_at_exact_size():
    model = TinyDiT(dim=64, layers=3)
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    handle = fo.enable(model, device="cuda")
    after = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    assert after == before  # torch's power-of-two caching host allocator is not used
    total = 0
    for store in handle._stores:
        _, nbytes = _ops.layout([v for v in store.views])
        assert store.buffer.is_pinned()
        assert store.buffer.numel() == nbytes
        total += nbytes
    assert handle.stats()["host_bytes"] == total


def test_enable_from_a_model_already_on_the_gpu():
    model = TinyDiT().cuda()
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cuda")
    assert all(s.buffer.is_pinned() for s in handle._stores)
    x = tiny_input().cuda()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    handle.disable()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert a.device.type == "cuda" and torch.equal(a, b)


def test_copy_of_next_block_overlaps_compute():
    model = Wide().half()
    fo.enable(model, device="cuda", prefetch=1)
    x = torch.randn(8192, 2048, device="cuda", dtype=torch.half)
    with torch.no_grad():
        model(x)  # warm-up: cuBLAS handles, first sync load
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            model(x)
            torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    copies = [e for e in events if "HtoD" in e.name]
    kernels = [e for e in events if "Memcpy" not in e.name and "Memset" not in e.name]
    assert len(copies) >= len(model.blocks) - 1  # one copy per block, not one per parameter
    assert len(copies) <= len(model.blocks) + 1

    def overlaps(a, b):
        return max(a.time_range.start, b.time_range.start) < min(a.time_range.end, b.time_range.end)

    overlapped = [c for c in copies if any(overlaps(c, k) for k in kernels)]
    assert len(overlapped) >= len(model.blocks) - 2


def test_peak_memory_is_bounded_by_slots():
    prefetch = 1
    x = torch.randn(512, 2048, device="cuda", dtype=torch.half)
    resident = Wide().half().cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        resident(x)
    activations = torch.cuda.max_memory_allocated() - base
    del resident
    torch.cuda.empty_cache()
    before_enable = torch.cuda.memory_allocated()

    model = Wide().half()
    handle = fo.enable(model, device="cuda", prefetch=prefetch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with torch.no_grad():
        for _ in range(2):
            model(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    stats = handle.stats()
    assert stats["device_bytes"] == (1 + prefetch) * stats["slot_bytes"]
    assert peak <= (1 + prefetch) * stats["slot_bytes"] + activations + (4 << 20)
    # enable put the non-block weights on the device, and nothing else
    assert start - before_enable <= _bytes(model.head.parameters()) + (1 << 20)


def test_a_device_budget_leaves_the_users_peak_measurement_alone():
    """The budget measures each forward's activations without resetting the allocator's peak,
    which the user (and the benchmark) read for their own measurements."""
    model = Wide(dim=1024, layers=6).half()
    reference = copy.deepcopy(model).cuda()
    x = torch.randn(256, 1024, device="cuda", dtype=torch.half)
    block = _bytes(model.blocks[0].parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    big = torch.empty(64 * block, dtype=torch.uint8, device="cuda")
    user_peak = torch.cuda.max_memory_allocated()
    del big
    handle = fo.enable(model, device="cuda", device_budget=_bytes(model.head.parameters()) + 5 * block)
    with torch.no_grad():
        expected = reference(x)
        for _ in range(3):
            assert torch.equal(model(x), expected)
    assert torch.cuda.max_memory_allocated() >= user_peak
    # Measured at the blocks' ends: the forward's activations were seen even below the user's peak.
    assert handle._budget._activations > 0


def test_a_re_plan_after_the_first_forward_copies_only_the_streamed_blocks():
    """On CUDA the first forward's activations re-plan the budget: the blocks that stay resident
    keep their slots, so the second forward copies the streamed blocks and nothing else."""
    model = Wide(dim=1024, layers=8).half()
    reference = copy.deepcopy(model).cuda()
    x = torch.randn(256, 1024, device="cuda", dtype=torch.half)
    block = _bytes(model.blocks[0].parameters())
    handle = fo.enable(model, device="cuda", prefetch=1,
                       device_budget=_bytes(model.head.parameters()) + (4 + 2) * block + 64 * 2**20)
    with torch.no_grad():
        expected = reference(x)
        for step in range(3):
            assert torch.equal(model(x), expected)
            if step:
                assert handle.stats()["forward_h2d_bytes"] == handle._budget.plan.streamed_bytes


def test_experts_of_a_group_share_pinned_staging_buffers():
    """Each switch between two experts staged from pageable memory takes the pinned buffers the
    other gave back: none is pinned (cudaHostAlloc) after the first."""
    models = [Wide(dim=1024, layers=4).half() for _ in range(2)]
    references = [copy.deepcopy(m).cuda() for m in models]
    handles = [fo.enable(m, device="cuda", group="experts", host_pin_budget=0) for m in models]
    x = torch.randn(64, 1024, device="cuda", dtype=torch.half)
    with torch.no_grad():
        expected = [r(x) for r in references]
        for step in range(6):
            active = step % 2
            assert torch.equal(models[active](x), expected[active])
    allocs = {h.stats()["staging_buffer_allocs"] for h in handles}
    assert allocs == {3}, allocs


def test_pinning_the_driver_refuses_falls_back_to_staging(tmp_path, monkeypatch):
    """cudaHostRegister unsupported (a sandbox, a driver) on a node's shared store: staged, exact."""
    import torch.distributed as dist

    def unsupported(memory, device, read_only=False):
        raise NotImplementedError("cudaHostRegister of 4096 bytes failed: operation not supported")

    monkeypatch.setattr(_ops, "pin_host", unsupported)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = TinyDiT().eval()
        reference = copy.deepcopy(model).cuda()
        handle = fo.enable(model, device="cuda", share="node")
        assert handle.stats()["staged_blocks"] == 4
        with torch.no_grad():
            x = tiny_input().cuda()
            for _ in range(2):
                assert torch.equal(model(x), reference(x))
        handle.disable()
    finally:
        dist.destroy_process_group()


def test_read_only_pages_are_registered_in_place():
    """A node's followers map the shared store read-only: their pages are registered with
    cudaHostRegisterReadOnly and copied from in place."""
    import mmap

    fd = os.memfd_create("fastvideo_offload-test")
    try:
        data = torch.arange(1 << 20, dtype=torch.int32)
        os.write(fd, data.numpy().tobytes())
        pages = mmap.mmap(fd, data.numel() * 4, mmap.MAP_SHARED, mmap.PROT_READ)
        with pytest.warns(UserWarning, match="not writable"):
            memory = torch.frombuffer(memoryview(pages), dtype=torch.uint8)
        _ops.pin_host(memory, torch.device("cuda"), read_only=True)
        try:
            copied = memory.to("cuda", non_blocking=True).view(torch.int32)
            assert torch.equal(copied.cpu(), data)
        finally:
            torch.cuda.synchronize()
            _ops.unpin_host(memory, torch.device("cuda"))
    finally:
        os.close(fd)


def test_trim_gives_the_slots_back():
    model = Wide(dim=1024, layers=4).half()
    handle = fo.enable(model, device="cuda")
    x = torch.randn(64, 1024, device="cuda", dtype=torch.half)
    with torch.no_grad():
        expected = model(x)
    held = torch.cuda.memory_allocated()
    handle.trim()
    assert handle.stats()["device_bytes"] == 0
    freed = held - torch.cuda.memory_allocated()
    slots = 2 * handle.stats()["slot_bytes"]
    # The caching allocator rounds, and may keep up to 1 MiB of a block it did not split.
    assert slots <= freed <= slots + 2 * (1 << 20)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_block_split_across_devices_is_refused():
    model = TinyDiT()
    model.blocks[1].proj.cuda()
    with pytest.raises(ValueError, match=r"block blocks\.1 has parameters on several devices"):
        fo.enable(model, device="cuda")
    assert fo.handle_of(model) is None
    assert all(p.numel() > 0 for p in model.parameters())


def test_prefetch_without_device_memory_on_cuda():
    model = TinyDiT(dim=64, layers=5)
    reference = copy.deepcopy(model).cuda()
    handle = fo.enable(model, device="cuda", prefetch=2)
    handle.limit_device_memory(handle.stats()["slot_bytes"])
    x = tiny_input().cuda()
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), reference(x))
    stats = handle.stats()
    assert stats["prefetches_skipped"] > 0 and stats["device_bytes"] == stats["slot_bytes"]


def test_a_thousand_forwards_hold_device_memory():
    model = TinyDiT(dim=64, layers=6)
    fo.enable(model, device="cuda")
    x = tiny_input().cuda()
    with torch.no_grad():
        for _ in range(20):
            model(x)
        torch.cuda.synchronize()
        gc.collect()
        start = torch.cuda.memory_allocated()
        for _ in range(1000):
            model(x)
        torch.cuda.synchronize()
    gc.collect()
    assert torch.cuda.memory_allocated() == start


# ---- the first GPU run's known risks ----

# About a millisecond of GPU time on an H100 or H200 (torch.cuda._sleep spins for clock cycles).
_SLEEP_CYCLES = 2_000_000


def _gpu_sleep(block):
    torch.cuda._sleep(_SLEEP_CYCLES)


def _lag(model):
    """Every block's kernels start a millisecond late, so the GPU falls far behind the host. (A
    function, so that no loop variable keeps a block, and through its hooks the handle, alive.)"""
    for block in model.blocks:
        block.probe = _gpu_sleep


@pytest.fixture
def memory_fraction():
    """Sets this process's share of the device memory; always put back to all of it."""
    try:
        yield lambda fraction: torch.cuda.set_per_process_memory_fraction(fraction)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def pinned_gib():
    """1 GiB of pinned host memory, for a copy that keeps the host-to-device link busy."""
    return torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)


def test_pinned_memory_for_a_missing_device_is_refused():
    count = torch.cuda.device_count()
    with pytest.raises(ValueError, match="no such device"):
        _ops.pack([torch.zeros(4)], [0], 16, True, torch.device("cuda", count))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_offloading_to_the_second_gpu_creates_no_context_on_the_first():
    """cudaHostAlloc works in the current device's context: pinning for cuda:1 without a guard
    would create a context (hundreds of MiB) on cuda:0. A fresh process, so no test before it made one."""
    code = (
        "import torch, fastvideo_offload as fo\n"
        "from support.models import TinyDiT\n"
        "import gc\n"
        "model, staged = TinyDiT().eval(), TinyDiT().eval()\n"
        "handle = fo.enable(model, device='cuda:1')\n"
        "assert all(s.buffer.is_pinned() for s in handle._stores)\n"
        # Staged: the staging threads wait on the copy stream's events, and the pinned ring is freed
        # by whichever thread drops it last.
        "staged_handle = fo.enable(staged, device='cuda:1', host_pin_budget=0)\n"
        "x = torch.randn(1, 16, 8, device='cuda:1')\n"
        "with torch.no_grad():\n"
        "    for _ in range(2):\n"
        "        model(x), staged(x)\n"
        "staged_handle.disable()\n"
        "del staged_handle, staged\n"
        "gc.collect()\n"
        "contexts = torch._C._cuda_hasPrimaryContext(0), torch._C._cuda_hasPrimaryContext(1)\n"
        "print(*contexts)\n"
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["False", "True"]


def test_failed_enable_leaves_a_host_model_on_the_host(monkeypatch):
    """cudaHostAlloc failing part-way (a cgroup limit): nothing moved to the GPU stays there."""
    model = TinyDiT(layers=4)
    before = snapshot(model)
    allocated = torch.cuda.memory_allocated()
    real_pack, packed = _ops.pack, []

    def pack(*args):
        if len(packed) == 2:
            raise RuntimeError("CUDA error: out of memory")  # what cudaHostAlloc's failure says
        packed.append(args[2])
        return real_pack(*args)

    monkeypatch.setattr(_ops, "pack", pack)
    with pytest.raises(RuntimeError, match=r"packing block blocks\.2 failed after obtaining \d+ of the \d+ bytes"
                       r" .* of pinned host memory"):
        fo.enable(model, device="cuda")
    assert_unchanged(model, before, moved=["blocks.0.", "blocks.1."])
    assert torch.cuda.memory_allocated() == allocated


@pytest.mark.parametrize("on_gpu", [False, True])
def test_failed_enable_after_every_block_was_packed(monkeypatch, on_gpu):
    """The last step fails, after resident weights and buffers moved: all come back. A model on
    the GPU gets back its very tensors, without a copy."""
    model = TinyDiT()
    if on_gpu:
        model.cuda()
    before = snapshot(model)

    def fail(*args):
        raise RuntimeError("injected")

    monkeypatch.setattr(fo.offloader, "attach_state_dict_hooks", fail)
    with pytest.raises(RuntimeError, match="injected"):
        fo.enable(model, device="cuda")
    assert_unchanged(model, before, moved=() if on_gpu else ["blocks."])


def test_autocast_keeps_no_copy_of_the_blocks_on_the_gpu():
    """An fp32 model whose parameters require grad, under CUDA autocast: the cast cache would keep
    a bf16 copy of every block on the device; the device holds the slots and nothing more."""
    with torch.device("cuda"):
        model = TinyDiT(dim=512, layers=8)
    reference = copy.deepcopy(model)
    x = tiny_input().cuda()
    handle = fo.enable(model, device="cuda", prefetch=1)
    with torch.no_grad():
        model(x)  # the slots, allocated outside autocast
        with torch.autocast("cuda", dtype=torch.bfloat16):
            expected = reference(x)
    del reference
    gc.collect()
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            assert torch.equal(model(x), expected)
        torch.cuda.synchronize()
        # Still inside the region: a cache keeping the blocks' bf16 copies would hold 4 MiB per
        # block; what may stay is the head's copy, cast after the last block.
        assert torch.cuda.memory_allocated() <= held + (1 << 20)
    assert handle.stats()["device_bytes"] == 2 * handle.stats()["slot_bytes"]


class _SideStreamBlock(nn.Module):
    """Reads its weight on a side stream, late, and joins the calling stream back to that
    stream before returning: the rule the post-hook relies on (docs/reference.md, "Side streams")."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.side = None  # created at the first forward: a stream cannot be deep-copied

    def forward(self, x):
        caller = torch.cuda.current_stream()
        if self.side is None:
            self.side = torch.cuda.Stream()
        self.side.wait_stream(caller)  # the input, and the weights the pre-hook waited for
        with torch.cuda.stream(self.side):
            torch.cuda._sleep(_SLEEP_CYCLES)
            y = self.linear(x)
        caller.wait_stream(self.side)  # the join: the slot is released only after the side stream read it
        y.record_stream(caller)
        return x + y


class _SideStreamModel(nn.Module):
    def __init__(self, dim=2048, layers=8):
        super().__init__()
        self.blocks = nn.ModuleList(_SideStreamBlock(dim) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize("prefetch", [1, 2])
def test_work_on_a_side_stream_joined_back_is_exact(prefetch):
    """Each block reads its weight a millisecond late on another stream; the copies into its slot
    for later blocks are queued meanwhile. Joined back before returning, every read is exact."""
    with torch.device("cuda"):
        model = _SideStreamModel().half()
    reference = copy.deepcopy(model)
    fo.enable(model, device="cuda", prefetch=prefetch)
    inputs = [0.5 * torch.randn(256, 2048, device="cuda", dtype=torch.half) for _ in range(3)]
    with torch.no_grad():
        expected = [reference(x) for x in inputs]
        torch.cuda.synchronize()
        got = [model(x) for x in inputs]
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_outputs_exact_when_compute_lags_far_behind(prefetch):
    """Every block starts a millisecond late on the GPU, so the host runs whole forwards ahead and
    every copy into a slot is queued long before the block that last used the slot has run: a copy
    not ordered after that block's release overwrites weights it has yet to read."""
    with torch.device("cuda"):
        model = TinyDiT(dim=256, layers=8)
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cuda", prefetch=prefetch)
    _lag(model)
    inputs = [tiny_input().cuda() for _ in range(4)]
    with torch.no_grad():
        expected = [reference(x) for x in inputs]
        torch.cuda.synchronize()
        got = [model(x) for x in inputs]
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert handle.stats()["max_filled_ring_slots"] <= 1 + prefetch


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_outputs_exact_while_another_stream_floods_the_copy_link(prefetch, pinned_gib):
    """Gigabytes copied host-to-device on another stream at the same time: each block's copy takes
    several times longer, and a block that ran before its copy landed would read the bytes of the
    block that held its slot before."""
    with torch.device("cuda"):
        model = Wide(dim=1024, layers=6).half()
    reference = copy.deepcopy(model)
    fo.enable(model, device="cuda", prefetch=prefetch)
    x = 0.5 * torch.randn(64, 1024, device="cuda", dtype=torch.half)
    with torch.no_grad():
        expected = reference(x)
        model(x)  # slots allocated, cuBLAS ready
    target = torch.empty_like(pinned_gib, device="cuda")
    flood = torch.cuda.Stream()
    flood.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(flood):
        for _ in range(4):
            target.copy_(pinned_gib, non_blocking=True)
    with torch.no_grad():
        got = [model(x) for _ in range(3)]
    torch.cuda.synchronize()
    assert all(torch.equal(g, expected) for g in got)


@pytest.mark.parametrize("how", ["trim", "disable", "del model"])
def test_memory_freed_right_after_an_unsynchronized_forward(how):
    """The forward returns while the GPU is still blocks behind (each block starts a millisecond
    late) and copies into the slots are still queued. Its slots are freed at once, and tensors of a
    slot's size allocated and filled right away (the caching allocator hands them the freed memory).
    The forward's output, the new tensors and the restored weights must all come out exact."""
    with torch.device("cuda"):
        model = TinyDiT(dim=256, layers=8)
    reference = copy.deepcopy(model)
    x = tiny_input().cuda()
    with torch.no_grad():
        expected = reference(x)
    handle = fo.enable(model, device="cuda", prefetch=2)
    _lag(model)
    slot_bytes, engine = handle.stats()["slot_bytes"], handle._engine
    with torch.no_grad():
        model(x)  # slots allocated
        torch.cuda.synchronize()
        out = model(x)
    if how == "trim":
        handle.trim()
    elif how == "disable":
        handle.disable()
    else:
        del handle, model
        with pytest.raises(ValueError, match="no offload engine"):
            _ops.engine_stats(engine)  # freed with the model, not at a later GC pass
    reused = [torch.full((slot_bytes,), 0xA5, dtype=torch.uint8, device="cuda") for _ in range(4)]
    torch.cuda.synchronize()
    assert all(bool((t == 0xA5).all()) for t in reused)  # no late copy landed in freed slot memory
    assert torch.equal(out, expected)
    if how == "disable":
        for a, b in zip(model.parameters(), reference.parameters()):
            assert a.is_cuda and torch.equal(a, b)
    if how == "trim":
        with torch.no_grad():
            assert torch.equal(model(x), expected)


def _step_times(model, x, expected, steps):
    times = []
    with torch.no_grad():
        for _ in range(steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            assert torch.equal(out, expected)
    return sorted(times)[len(times) // 2]


def test_real_out_of_memory_on_prefetch(memory_fraction):
    """The process may hold what a forward with one slot needs and half a slot more: each prefetch
    of a second and third slot fails for real. The forward stays exact, as fast as prefetch 0, and
    the allocator's out-of-memory path (free every cached segment, synchronize, retry) is not run
    again at every block of every step."""
    with torch.device("cuda"):
        model = Wide(dim=2048, layers=4).half()
    x = 0.5 * torch.randn(16, 2048, device="cuda", dtype=torch.half)
    with torch.no_grad():
        expected = model(x)  # also sets up cuBLAS, whose workspace stays reserved
    handle = fo.enable(model, device="cuda", prefetch=0)
    slot = handle.stats()["slot_bytes"]
    _step_times(model, x, expected, 2)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    one_slot_step = _step_times(model, x, expected, 5)
    needed = torch.cuda.max_memory_reserved()  # this process, running with one slot

    handle.disable()
    handle = fo.enable(model, device="cuda", prefetch=2)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    memory_fraction((needed + slot // 2) / total)
    retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    torch.cuda.synchronize()
    after_first = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    step = _step_times(model, x, expected, 5)
    stats = handle.stats()
    assert stats["prefetches_skipped"] > 0
    assert stats["device_bytes"] == slot  # the ring never got its second slot
    assert torch.cuda.memory_stats().get("num_alloc_retries", 0) == after_first, (retries, after_first)
    assert step <= 1.5 * one_slot_step + 0.005, (step, one_slot_step)
