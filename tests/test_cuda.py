"""The CUDA path: pinned exact-size host buffers, a copy stream ordered by events, and the
memory bound. Skipped without a GPU; scripts/gpu_check.sh runs them on one."""

import copy
import gc

import pytest
import torch
from torch import nn

import fastvideo_offload as fo
from fastvideo_offload import _ops
from models import TinyDiT, tiny_input

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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
    assert stats["prefetch_skipped_oom"] > 0 and stats["device_bytes"] == stats["slot_bytes"]


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
