"""The asynchronous CPU device (FASTVIDEO_OFFLOAD_CPU_TRANSFER=async): copies on a thread with
random delays, releases completed late by a second thread, poisoned slots, and a checker that
raises on every ordering violation; and proof that it catches each injected fault.

`make test` also runs the whole suite on this device; these tests select it themselves."""

import copy
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import fastvideo_offload as fo
from support.models import ListOf, TinyDiT, tiny_input

HERE = os.path.dirname(os.path.abspath(__file__))
VIOLATION = "async CPU device: ordering violation"


@pytest.fixture
def async_device(monkeypatch):
    monkeypatch.setenv("FASTVIDEO_OFFLOAD_CPU_TRANSFER", "async")
    monkeypatch.setenv("FASTVIDEO_OFFLOAD_ASYNC_DELAY_US", "500")
    monkeypatch.setenv("FASTVIDEO_OFFLOAD_ASYNC_CHUNK_BYTES", "4096")
    monkeypatch.delenv("FASTVIDEO_OFFLOAD_INJECT_FAULT", raising=False)
    return monkeypatch


def run(model, inputs):
    with torch.no_grad():
        return [model(x) for x in inputs]


@pytest.mark.parametrize("prefetch", [0, 1, 2, 7])
def test_outputs_and_schedule_match_the_synchronous_device(async_device, prefetch):
    inputs = [tiny_input() for _ in range(4)]
    reference = TinyDiT()
    expected = run(reference, inputs)
    stats = {}
    for kind in ("sync", "async"):
        async_device.setenv("FASTVIDEO_OFFLOAD_CPU_TRANSFER", kind)
        model = copy.deepcopy(reference)
        handle = fo.enable(model, device="cpu", prefetch=prefetch)
        assert all(torch.equal(e, g) for e, g in zip(expected, run(model, inputs)))
        stats[kind] = handle.stats()
        handle.disable()
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    # The device changes when bytes land, never what the engine decides.
    assert stats["async"] == stats["sync"]


def test_reads_outside_a_blocks_window_are_poisoned(async_device):
    """A view of a block's weights kept past its forward (a model reaching into a block from
    outside, a side stream not joined back) reads a released slot. With every block cached in a
    slot (prefetch 7) the synchronous device leaves the stale bytes intact, so the mistake goes
    unseen; the asynchronous device poisons a slot when its block releases it."""
    kept, real = {}, {}
    for kind in ("sync", "async"):
        async_device.setenv("FASTVIDEO_OFFLOAD_CPU_TRANSFER", kind)
        model = TinyDiT()
        views = []
        for block in model.blocks:
            block.probe = lambda b: views.append(b.proj.weight.detach())  # keeps its slot's memory alive
        handle = fo.enable(model, device="cpu", prefetch=7)
        run(model, [tiny_input() for _ in range(3)])
        handle.trim()  # waits for every release to complete
        kept[kind] = views[-len(model.blocks):]
        with handle.mutate():
            real[kind] = [b.proj.weight.clone() for b in model.blocks]
    assert all(torch.equal(v, w) for v, w in zip(kept["sync"], real["sync"]))
    assert all(torch.isnan(v).all() for v in kept["async"])


def test_the_device_rejects_bad_settings(monkeypatch):
    model = TinyDiT()
    for var, value, message in [
        ("FASTVIDEO_OFFLOAD_CPU_TRANSFER", "gpu", "must be sync or async"),
        ("FASTVIDEO_OFFLOAD_INJECT_FAULT", "skip_everything", "unknown fault 'skip_everything'"),
        ("FASTVIDEO_OFFLOAD_ASYNC_DELAY_US", "-3", "FASTVIDEO_OFFLOAD_ASYNC_DELAY_US must be an integer >= 0"),
        ("FASTVIDEO_OFFLOAD_ASYNC_CHUNK_BYTES", "0", "FASTVIDEO_OFFLOAD_ASYNC_CHUNK_BYTES must be an integer >= 1"),
    ]:
        with monkeypatch.context() as m:
            m.setenv("FASTVIDEO_OFFLOAD_CPU_TRANSFER", "async")
            m.setenv(var, value)
            with pytest.raises(ValueError, match=message):
                fo.enable(model, device="cpu")
        assert fo.handle_of(model) is None and all(p.numel() > 0 for p in model.parameters())


class _HeadAndTail(nn.Module):
    """One block: a small weight at the start of its slot, 40 MiB at the end. A slot this large
    is fresh mapped memory (above glibc's largest mmap threshold, 32 MiB), which reads as zeros
    until something writes it: what a read finds there before the copy comes from the device."""

    def __init__(self):
        super().__init__()
        self.head = nn.Parameter(torch.randn(64))
        self.tail = nn.Parameter(torch.randn(10 << 20))
        self.probe = None

    def forward(self, x):
        self.probe(self)
        return x


@pytest.mark.injected_race
def test_weights_read_before_their_copy_is_done_read_as_poison(async_device):
    """With the ready wait skipped, a block reads its slot while the copy is still landing in slow
    chunks: once the head has arrived, the tail that has not reads as poison (0xFF, NaN), written
    before the copy began, not as whatever the slot's memory held. Then the checker catches it."""
    async_device.setenv("FASTVIDEO_OFFLOAD_INJECT_FAULT", "skip_ready_wait")
    async_device.setenv("FASTVIDEO_OFFLOAD_ASYNC_DELAY_US", "20000")  # 40 chunks of up to 20 ms
    async_device.setenv("FASTVIDEO_OFFLOAD_ASYNC_CHUNK_BYTES", str(1 << 20))
    async_device.setenv("FASTVIDEO_OFFLOAD_ASYNC_SEED", "0")
    model = ListOf([_HeadAndTail()])
    head = model.layers[0].head.detach().clone()
    fo.enable(model, device="cpu", blocks=["layers"])
    seen = []

    def probe(block):
        deadline = time.monotonic() + 30
        while not torch.equal(block.head, head):  # the first chunk has landed: the poison is down
            assert time.monotonic() < deadline, "the copy's first chunk never landed"
            time.sleep(0.001)
        # The last chunk lands after 39 more delays, about 0.4 s: far later than this read.
        seen.append(block.tail.detach()[-(1 << 18):].view(torch.uint8).clone())

    model.layers[0].probe = probe
    with pytest.raises(RuntimeError, match=f"{VIOLATION}: a block ran from slot 0 without waiting for its copy"):
        run(model, [tiny_input()])
    assert len(seen) == 1 and bool((seen[0] == 0xFF).all())


# ---- each injected fault is caught: by the checker directly, and by the suite ----


@pytest.mark.injected_race
def test_checker_catches_a_block_run_before_its_copy(async_device):
    async_device.setenv("FASTVIDEO_OFFLOAD_INJECT_FAULT", "skip_ready_wait")
    model = TinyDiT()
    fo.enable(model, device="cpu")
    with pytest.raises(RuntimeError, match=f"{VIOLATION}: a block ran from slot . without waiting for its copy"):
        run(model, [tiny_input()])


@pytest.mark.injected_race
def test_checker_catches_a_copy_not_ordered_after_the_release(async_device):
    async_device.setenv("FASTVIDEO_OFFLOAD_INJECT_FAULT", "skip_release_wait")
    async_device.setenv("FASTVIDEO_OFFLOAD_ASYNC_DELAY_US", "3000")  # releases complete late
    model = TinyDiT(layers=6)
    fo.enable(model, device="cpu")
    with pytest.raises(RuntimeError, match=f"{VIOLATION}: a copy into slot . started before the compute side"):
        run(model, [tiny_input() for _ in range(5)])


@pytest.mark.injected_race
def test_checker_catches_slot_memory_freed_in_flight(async_device):
    async_device.setenv("FASTVIDEO_OFFLOAD_INJECT_FAULT", "free_unsynchronized")
    async_device.setenv("FASTVIDEO_OFFLOAD_ASYNC_DELAY_US", "3000")
    model = TinyDiT()
    handle = fo.enable(model, device="cpu")
    run(model, [tiny_input()])
    with pytest.raises(RuntimeError, match=f"{VIOLATION}: slot .'s memory was freed without waiting"):
        handle.trim()


@pytest.mark.sync_pass_only
@pytest.mark.injected_race
@pytest.mark.parametrize(
    "fault, tests, caught_by",
    [
        ("skip_ready_wait", ["tests/test_enable.py", "-k", "bit_identical"], "test_outputs_bit_identical"),
        ("skip_release_wait", ["tests/test_enable.py", "-k", "bit_identical"], "test_outputs_bit_identical"),
        ("free_unsynchronized", ["tests/test_reliability.py", "-k", "trim_disable_and_del"],
         "test_trim_disable_and_del_right_after"),
    ],
)
def test_the_suite_fails_with_each_fault(fault, tests, caught_by):
    """The fault switched on under ordinary tests of the suite, which know nothing of it: they fail."""
    env = dict(os.environ, FASTVIDEO_OFFLOAD_CPU_TRANSFER="async", FASTVIDEO_OFFLOAD_INJECT_FAULT=fault,
               FASTVIDEO_OFFLOAD_ASYNC_DELAY_US="1000")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stdout[-2000:]
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAILED")]
    assert failed and all(caught_by in line for line in failed), result.stdout[-2000:]
    assert VIOLATION in result.stdout


def test_a_failed_prefetch_allocation_waits_for_the_next_forward():
    """Once a prefetch slot could not be had, no prefetch asks again within the same forward: on
    a GPU each ask would run the allocator's out-of-memory path (a device synchronize and a
    cache flush) for every block of every step."""
    model = TinyDiT(layers=5)
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cpu", prefetch=2)
    handle.limit_device_memory(handle.stats()["slot_bytes"])  # room for one slot only
    model.blocks[2].probe = lambda block: handle.limit_device_memory(None)  # room again, mid-forward
    x = tiny_input()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        first = handle.stats()
        assert first["prefetches"] == 0 and first["device_slots"] == 1  # not retried after block 2 lifted the cap
        model.blocks[2].probe = None
        assert torch.equal(model(x), reference(x))
    assert handle.stats()["prefetches"] > 0 and handle.stats()["device_slots"] == 3
