"""The pinned-memory budget (enable's host_pin_budget): blocks outside it stay pageable and reach
the device through the engine's staging ring (csrc/staging.cpp), on both CPU devices."""

import copy
import json
import logging
import time
from collections import Counter

import pytest
import torch

import fastvideo_offload as fo
from fastvideo_offload import _ops, pinning
from fastvideo_offload import checkpoint as ckpt
from fastvideo_offload.bench import measure
from fastvideo_offload.store import BlockStore
from support.models import Interleaved, TinyDiT, tiny_input

LAYERS = 6
GiB = 1 << 30


@pytest.fixture(params=["sync", "async"])
def cpu_device(request, monkeypatch):
    """Both CPU devices; on the asynchronous one, copies and releases with random delays."""
    monkeypatch.setenv("FASTVIDEO_OFFLOAD_CPU_TRANSFER", request.param)
    monkeypatch.setenv("FASTVIDEO_OFFLOAD_ASYNC_DELAY_US", "300")
    monkeypatch.setenv("FASTVIDEO_OFFLOAD_ASYNC_CHUNK_BYTES", "8192")
    monkeypatch.delenv("FASTVIDEO_OFFLOAD_INJECT_FAULT", raising=False)
    return monkeypatch


def block_bytes(model) -> list[int]:
    return [BlockStore.nbytes(list(b.parameters())) for b in model.blocks]


def run(model, inputs):
    with torch.no_grad():
        return [model(x) for x in inputs]


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("pinned_blocks", [0, 2, LAYERS])
def test_staged_is_bit_identical_and_counted_exactly(cpu_device, prefetch, pinned_blocks):
    reference = TinyDiT(layers=LAYERS)
    inputs = [tiny_input() for _ in range(4)]
    expected = run(reference, inputs)
    model = copy.deepcopy(reference)
    sizes = block_bytes(model)
    handle = fo.enable(model, device="cpu", prefetch=prefetch, host_pin_budget=sum(sizes[:pinned_blocks]))
    stats = handle.stats()
    staged = sizes[pinned_blocks:]
    assert stats["staged_blocks"] == len(staged)
    assert stats["pinned_bytes"] == sum(sizes[:pinned_blocks])
    counts = []
    with torch.no_grad():
        for x, e in zip(inputs, expected):
            assert torch.equal(model(x), e)
            s = handle.stats()
            counts.append((s["staged_bytes"], s["stagings"]))
    # Every block is uploaded once a step (the ring holds fewer than all), each staged one
    # through exactly one staging: the steady state stages the staged blocks' bytes. A prefetch
    # never waits for staging, so whether the next step's first staged blocks were prefetched
    # before a step ended depends on the staging threads' timing: a step's count is exact up to
    # the `prefetch` blocks that may cross its boundary (exact at prefetch 0).
    slack = prefetch * max(staged, default=0)
    for (bytes0, fills0), (bytes1, fills1) in zip(counts[1:], counts[2:]):
        assert abs(bytes1 - bytes0 - sum(staged)) <= slack
        assert abs(fills1 - fills0 - len(staged)) <= prefetch
    # Each staging carried one whole block (TinyDiT's blocks are one size).
    assert counts[-1][0] == counts[-1][1] * (staged[0] if staged else 0)
    assert handle.stats()["staging_buffer_bytes"] == (prefetch + 2) * max(staged, default=0) * bool(staged)
    handle.disable()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


@pytest.mark.parametrize("threads", [1, 3])
def test_staging_threads_and_learned_order(cpu_device, threads):
    """Lists that interleave run in another order than registered: staging follows the order learned."""
    reference = Interleaved()
    inputs = [tiny_input() for _ in range(3)]
    expected = run(reference, inputs)
    model = copy.deepcopy(reference)
    handle = fo.enable(model, device="cpu", prefetch=1, host_pin_budget=0, staging_threads=threads)
    assert all(torch.equal(e, g) for e, g in zip(expected, run(model, inputs)))
    assert handle.stats()["staged_blocks"] == handle.stats()["blocks"]


@pytest.mark.parametrize("threads", [1, 2])
def test_the_staging_trace_records_every_fill(cpu_device, threads):
    """While tracing is on, the staging threads record each piece they copy, on the clock of
    time.monotonic_ns(). TinyDiT's blocks are one piece each, so a row is one fill."""
    model = TinyDiT(layers=LAYERS)
    pinned, steps, prefetch = 2, 3, 1
    handle = fo.enable(model, device="cpu", prefetch=prefetch, host_pin_budget=sum(block_bytes(model)[:pinned]),
                       staging_threads=threads)
    handle.trace_staging(True)  # before the ring exists: it starts tracing when made
    before = time.monotonic_ns()
    run(model, [tiny_input() for _ in range(steps)])
    after = time.monotonic_ns()
    trace = handle.staging_trace()
    stagings = handle.stats()["stagings"]
    block, thread, start, end = trace.T
    assert set(block.tolist()) == set(range(pinned, LAYERS))  # the staged blocks only
    assert ((thread >= 0) & (thread < threads)).all()
    assert (before <= start).all() and (start <= end).all() and (end <= after).all()
    # A fill is recorded when its copy ends and counted in `stagings` when an upload takes it,
    # which it does once. So every fill taken is in the trace, and the trace also has those the
    # ring (prefetch + 2 buffers) filled ahead for the next step: each staged block was filled
    # once per step, or once more.
    assert stagings <= len(trace) <= stagings + prefetch + 2
    assert set(Counter(block.tolist()).values()) <= {steps, steps + 1}
    # Read and cleared: a second read has only fills that ended after the first (one the ring was
    # making ahead when the forward returned may end between the two reads).
    again = handle.staging_trace()
    assert len(again) <= prefetch + 2 and not {tuple(r) for r in trace.tolist()} & {tuple(r) for r in again.tolist()}
    handle.trace_staging(False)
    run(model, [tiny_input()])  # takes the fills that were in progress, traced, when it was switched off
    handle.staging_trace()
    run(model, [tiny_input()])
    assert len(handle.staging_trace()) == 0


@pytest.mark.injected_race
def test_reusing_a_staging_buffer_before_its_upload_finished_is_caught(cpu_device):
    """The fault refills a staging buffer while the copy engine still reads it: the slot gets
    another block's bytes, and the outputs show it (slow copies make the overlap certain)."""
    cpu_device.setenv("FASTVIDEO_OFFLOAD_CPU_TRANSFER", "async")
    cpu_device.setenv("FASTVIDEO_OFFLOAD_ASYNC_DELAY_US", "2000")
    cpu_device.setenv("FASTVIDEO_OFFLOAD_INJECT_FAULT", "reuse_staging_early")
    reference = TinyDiT(layers=LAYERS)
    inputs = [tiny_input() for _ in range(3)]
    expected = run(reference, inputs)
    model = copy.deepcopy(reference)
    fo.enable(model, device="cpu", prefetch=1, host_pin_budget=0)
    assert not all(torch.equal(e, g) for e, g in zip(expected, run(model, inputs)))


def test_auto_pin_budget_arithmetic():
    meminfo = "MemTotal:       16777216 kB\nMemFree: 1 kB\nMemAvailable:   12582912 kB\n"  # 16 GiB, 12 GiB

    def reader(files):
        return lambda path: files.get(path, meminfo if path == "/proc/meminfo" else None)

    # No cgroup limit: 12 GiB available less max(2 GiB, 16 GiB / 4).
    assert pinning.auto_pin_budget(reader({"/sys/fs/cgroup/memory.max": "max\n"})) == 8 * GiB
    # cgroup v2 limit of 8 GiB with 3 GiB used: 5 GiB available less max(2 GiB, 2 GiB).
    v2 = {"/sys/fs/cgroup/memory.max": f"{8 * GiB}\n", "/sys/fs/cgroup/memory.current": f"{3 * GiB}\n"}
    assert pinning.auto_pin_budget(reader(v2)) == 3 * GiB
    # cgroup v1 limit of 12 GiB with 10 GiB used: 2 GiB available, all of it headroom.
    v1 = {"/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{12 * GiB}\n",
          "/sys/fs/cgroup/memory/memory.usage_in_bytes": f"{10 * GiB}\n"}
    assert pinning.auto_pin_budget(reader(v1)) == 0
    # v1 without a limit says about 2**63.
    unlimited_v1 = {"/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712"}
    assert pinning.auto_pin_budget(reader(unlimited_v1)) == 8 * GiB
    with pytest.raises(RuntimeError, match="MemAvailable"):
        pinning.auto_pin_budget(lambda path: "MemTotal: 1 kB\n" if path == "/proc/meminfo" else None)


def test_auto_pin_budget_on_this_machine(cpu_device):
    available = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    budget = pinning.auto_pin_budget()
    assert 0 <= budget <= available
    reference = TinyDiT()
    model = copy.deepcopy(reference)
    handle = fo.enable(model, device="cpu", host_pin_budget="auto")
    # This model is far below any real budget: every block pinned.
    assert handle.stats()["staged_blocks"] == 0
    x = tiny_input()
    assert torch.equal(run(model, [x])[0], run(reference, [x])[0])


def test_a_pinning_failure_part_way_falls_back_to_staging(cpu_device, monkeypatch, caplog):
    pinned = []

    def pin_twice(self, make):
        if len(pinned) == 2:
            raise RuntimeError("CUDA error: out of memory")
        pinned.append(1)
        return make(self.cuda)

    monkeypatch.setattr(pinning.PinPlan, "_pin", pin_twice)
    reference = TinyDiT(layers=LAYERS)
    inputs = [tiny_input() for _ in range(3)]
    model = copy.deepcopy(reference)
    sizes = block_bytes(model)
    with caplog.at_level(logging.WARNING, logger="fastvideo_offload"):
        handle = fo.enable(model, device="cpu", prefetch=1, host_pin_budget=GiB)
    assert "pinning host memory failed" in caplog.text
    assert handle.stats()["staged_blocks"] == LAYERS - 2
    assert handle.stats()["pinned_bytes"] == sum(sizes[:2])
    assert all(torch.equal(e, g) for e, g in zip(run(reference, inputs), run(model, inputs)))


def test_a_budget_smaller_than_a_block_stages_every_block(cpu_device):
    reference = TinyDiT()
    model = copy.deepcopy(reference)
    handle = fo.enable(model, device="cpu", host_pin_budget=1)
    assert handle.stats()["staged_blocks"] == 4 and handle.stats()["pinned_bytes"] == 0
    x = tiny_input()
    assert torch.equal(run(model, [x])[0], run(reference, [x])[0])


def test_weights_change_trim_and_disable_with_staged_blocks(cpu_device):
    reference = TinyDiT(layers=LAYERS)
    model = copy.deepcopy(reference)
    sizes = block_bytes(model)
    handle = fo.enable(model, device="cpu", prefetch=1, host_pin_budget=sum(sizes[:3]))
    x = tiny_input()
    run(model, [x, x])  # staging buffers now hold blocks ahead, with the old weights
    with handle.mutate(model.blocks[4]), torch.no_grad():
        model.blocks[4].proj.weight.add_(1.0)
    with torch.no_grad():
        reference.blocks[4].proj.weight.add_(1.0)
    assert torch.equal(run(model, [x])[0], run(reference, [x])[0])
    new = TinyDiT(layers=LAYERS).state_dict()
    model.load_state_dict(new)
    reference.load_state_dict(new)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in new.items())
    assert torch.equal(run(model, [x])[0], run(reference, [x])[0])
    handle.trim()
    assert torch.equal(run(model, [x])[0], run(reference, [x])[0])
    handle.disable()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))


def test_trim_frees_the_staging_ring(cpu_device):
    """An idle model's pinned staging buffers go with its slots; the next staged upload makes the
    ring again. Its counts and trace go on across it."""
    reference = TinyDiT(layers=LAYERS)
    model = copy.deepcopy(reference)
    handle = fo.enable(model, device="cpu", prefetch=1, host_pin_budget=sum(block_bytes(model)[:2]))
    handle.trace_staging(True)
    x = tiny_input()
    expected = run(reference, [x])[0]
    assert torch.equal(run(model, [x])[0], expected)
    ring, stagings = handle.stats()["staging_buffer_bytes"], handle.stats()["stagings"]
    assert ring > 0
    handle.trim()
    stats = handle.stats()
    assert stats["staging_buffer_bytes"] == 0 and stats["device_bytes"] == 0
    assert stats["staging_pool_bytes"] == 0  # a model of no group keeps none of them either
    assert stats["stagings"] == stagings
    assert len(handle.staging_trace()) >= stagings  # the freed ring's trace
    assert torch.equal(run(model, [x])[0], expected)
    stats = handle.stats()
    assert stats["staging_buffer_bytes"] == ring and stats["stagings"] >= 2 * stagings
    assert len(handle.staging_trace()) >= stagings  # the new ring traces too


def test_experts_of_a_group_share_one_set_of_staging_buffers(cpu_device):
    """Wan2.2's experts take turns: the one that starts takes the staging buffers the idle one gave
    back, so a switch allocates (on CUDA: pins) none, and only one set is held at a time."""
    references = [TinyDiT(layers=LAYERS) for _ in range(2)]
    models = [copy.deepcopy(r) for r in references]
    handles = [fo.enable(m, device="cpu", prefetch=1, group="experts", host_pin_budget=0) for m in models]
    block = max(block_bytes(references[0]))
    x = tiny_input()
    for step in range(8):
        active = (step // 2) % 2  # two steps each, as a denoising loop switches experts
        assert torch.equal(run(models[active], [x])[0], run(references[active], [x])[0])
        on, idle = handles[active].stats(), handles[1 - active].stats()
        assert on["staging_buffer_bytes"] == 3 * block  # prefetch 1: two uploads in flight and one filling
        assert idle["staging_buffer_bytes"] == 0 and idle["device_bytes"] == 0
        assert on["staging_buffer_allocs"] == idle["staging_buffer_allocs"] == 3
    for h in handles:
        h.trim()
    # Trimmed, the group still holds one set for whichever expert runs next.
    assert handles[0].stats()["staging_pool_bytes"] == 3 * block


def test_pinning_the_driver_does_not_support_falls_back_to_staging(cpu_device, monkeypatch, caplog):
    """cudaHostRegister unsupported (some sandboxes and drivers) is not out of memory: with a pin
    budget or without one, the blocks are staged, with a warning that says why."""
    def unsupported(self, make):
        raise NotImplementedError("cudaHostRegister of 4096 bytes failed: operation not supported")

    monkeypatch.setattr(pinning.PinPlan, "_pin", unsupported)
    reference = TinyDiT(layers=LAYERS)
    inputs = [tiny_input() for _ in range(2)]
    for budget in (None, GiB):
        model = copy.deepcopy(reference)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="fastvideo_offload"):
            handle = fo.enable(model, device="cpu", host_pin_budget=budget)
        failed = "pinning host memory failed (cudaHostRegister of 4096 bytes failed: operation not supported)"
        assert failed in caplog.text
        assert handle.stats()["staged_blocks"] == LAYERS and handle.stats()["pinned_bytes"] == 0
        assert all(torch.equal(e, g) for e, g in zip(run(reference, inputs), run(model, inputs)))


@pytest.mark.parametrize("prefetch", [100_000, 2**63 - 1])
def test_the_staging_ring_holds_no_more_than_can_be_in_flight(cpu_device, prefetch):
    """A deep prefetch is cut to the blocks there are, and the ring to the staged blocks."""
    reference = TinyDiT(layers=LAYERS)
    model = copy.deepcopy(reference)
    handle = fo.enable(model, device="cpu", prefetch=prefetch, host_pin_budget=0)
    x = tiny_input()
    for _ in range(2):
        assert torch.equal(run(model, [x])[0], run(reference, [x])[0])
    stats = handle.stats()
    assert handle.prefetch == stats["prefetch"] == LAYERS - 1
    assert stats["staging_buffer_bytes"] == LAYERS * max(block_bytes(reference))


def test_bad_arguments_leave_the_model_alone():
    model = TinyDiT()
    reference = copy.deepcopy(model)
    for kwargs, error in [
        ({"host_pin_budget": -1}, ValueError),
        ({"host_pin_budget": "some"}, TypeError),
        ({"host_pin_budget": 1.5}, TypeError),
        ({"host_pin_budget": 2**63}, ValueError),
        ({"staging_threads": 0}, ValueError),
        ({"staging_threads": "2"}, TypeError),
    ]:
        with pytest.raises(error):
            fo.enable(model, device="cpu", **kwargs)
    assert fo.handle_of(model) is None
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    with pytest.raises(ValueError, match="staging_threads"):
        _ops.engine_create(torch.device("cpu"), 1, 0)


def test_staging_throughput_measures_staged_bytes(cpu_device):
    """The benchmark's staging row counts what went through the staging buffers: every upload of
    these pageable blocks, each its whole block, no more, no fewer (how many blocks the slots kept
    from one step to the next depends on the staging threads' timing)."""
    counts, seconds = measure.staged_steps(2, block_bytes=1 << 20, blocks=3, steps=2)
    assert counts["stagings"] == counts["uploads"] > 0 and seconds > 0
    assert counts["staged_bytes"] == counts["stagings"] * (1 << 20)


def test_a_checkpoint_loads_into_pinned_and_staged_blocks(cpu_device, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from safetensors.torch import save_file

    reference = TinyDiT(layers=LAYERS)
    save_file(reference.state_dict(), str(tmp_path / "m.safetensors"))
    with accelerate.init_empty_weights():  # buffers stay real: the non-persistent RoPE-like table
        model = TinyDiT(layers=LAYERS)
    sizes = block_bytes(reference)
    handle = fo.enable(model, device="cpu", checkpoint=tmp_path / "m.safetensors", host_pin_budget=sum(sizes[:2]))
    assert handle.stats()["staged_blocks"] == LAYERS - 2
    assert handle.stats()["pinned_bytes"] == sum(sizes[:2])
    assert handle.stats()["mapped_bytes"] == sum(sizes[2:])  # gathered from the file's pages
    inputs = [tiny_input() for _ in range(3)]
    assert all(torch.equal(e, g) for e, g in zip(run(reference, inputs), run(model, inputs)))


def _save_sharded(state: dict, root, shards: int = 3) -> tuple:
    """`state` as a sharded checkpoint, safetensors files and the index json that diffusers'
    save_pretrained writes; the shards are cut by key count, so blocks span two of them."""
    from safetensors.torch import save_file

    keys = list(state)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(root / name))
        weight_map.update(dict.fromkeys(part, name))
    index = root / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index, weight_map


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("pinned_blocks", [0, 2])
def test_staged_blocks_from_a_sharded_checkpoint(cpu_device, tmp_path, prefetch, pinned_blocks):
    """Each staged block is gathered from the pages of the shards that hold its tensors, a block
    cut across two shards from both."""
    accelerate = pytest.importorskip("accelerate")
    reference = TinyDiT(layers=LAYERS).eval()
    index, weight_map = _save_sharded(reference.state_dict(), tmp_path)
    files = {i: {f for k, f in weight_map.items() if k.startswith(f"blocks.{i}.")} for i in range(LAYERS)}
    assert len(set(weight_map.values())) == 3 and any(len(f) == 2 for i, f in files.items() if i >= pinned_blocks)
    with accelerate.init_empty_weights():
        model = TinyDiT(layers=LAYERS).eval()
    sizes = block_bytes(reference)
    handle = fo.enable(model, device="cpu", prefetch=prefetch, checkpoint=index,
                       host_pin_budget=sum(sizes[:pinned_blocks]))
    stats = handle.stats()
    assert stats["staged_blocks"] == LAYERS - pinned_blocks
    assert stats["pinned_bytes"] == sum(sizes[:pinned_blocks])
    assert stats["mapped_bytes"] == sum(sizes[pinned_blocks:])
    inputs = [tiny_input() for _ in range(3)]
    assert all(torch.equal(e, g) for e, g in zip(run(reference, inputs), run(model, inputs)))
    assert handle.stats()["staged_bytes"] >= len(inputs) * sum(sizes[pinned_blocks:])
    got, expected = model.state_dict(), reference.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def _saved(tmp_path, dim: int = 32, seed: int = 0):
    accelerate = pytest.importorskip("accelerate")
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    reference = TinyDiT(dim, LAYERS).eval()
    save_file(reference.state_dict(), str(tmp_path / "m.safetensors"))
    with accelerate.init_empty_weights():
        model = TinyDiT(dim, LAYERS).eval()
    return reference, model


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def test_staged_blocks_from_a_checkpoint_stay_in_the_page_cache(tmp_path, monkeypatch):
    """Measured by the OS: enabling and running adds anonymous memory for the pinned blocks, slots
    and staging buffers only; the staged blocks are the file's pages (RssFile), which the page
    cache holds. The synchronous device: the asynchronous one keeps host copies of released slots."""
    monkeypatch.delenv("FASTVIDEO_OFFLOAD_CPU_TRANSFER", raising=False)
    reference, model = _saved(tmp_path, dim=512)  # 8.4 MB blocks: far above the interpreter's noise
    sizes = block_bytes(reference)
    x = torch.randn(1, 16, 8)
    expected = run(reference, [x])[0]
    del reference
    anon, file = _status("RssAnon:"), _status("RssFile:")
    handle = fo.enable(model, device="cpu", checkpoint=tmp_path / "m.safetensors", host_pin_budget=sum(sizes[:2]))
    assert torch.equal(run(model, [x])[0], expected)
    stats = handle.stats()
    anon, file = _status("RssAnon:") - anon, _status("RssFile:") - file
    own = stats["pinned_bytes"] + stats["device_bytes"] + stats["staging_buffer_bytes"]
    print(f"\nanonymous +{anon / 2**20:.1f} MiB (pinned blocks, slots, staging: {own / 2**20:.1f} MiB), file-backed "
          f"+{file / 2**20:.1f} MiB, staged blocks {stats['mapped_bytes'] / 2**20:.1f} MiB")
    assert stats["mapped_bytes"] == sum(sizes[2:])
    assert anon <= own + 8 * 2**20  # 8 MiB: the weights outside the blocks and Python's objects
    assert file >= 0.95 * stats["mapped_bytes"]


def test_weights_changed_under_offload_never_reach_the_checkpoint_file(cpu_device, tmp_path):
    """The mapping is private: load_state_dict writes copies of the pages it touches, the next
    forwards stage the new weights, and the file keeps its bytes."""
    _, model = _saved(tmp_path)
    path = tmp_path / "m.safetensors"
    original = path.read_bytes()
    handle = fo.enable(model, device="cpu", checkpoint=path, host_pin_budget=0)
    assert handle.stats()["mapped_bytes"] == handle.stats()["host_bytes"]
    torch.manual_seed(1)
    changed = TinyDiT(32, LAYERS).eval()
    x = tiny_input()
    run(model, [x])  # the staging ring holds the old weights now
    model.load_state_dict(changed.state_dict())
    assert torch.equal(run(model, [x])[0], run(changed, [x])[0])
    assert path.read_bytes() == original


def test_mapping_is_logged_and_a_file_that_cannot_be_mapped_is_read(cpu_device, tmp_path, monkeypatch, caplog):
    reference, model = _saved(tmp_path)
    x = tiny_input()
    with caplog.at_level(logging.INFO, logger="fastvideo_offload"):
        handle = fo.enable(model, device="cpu", checkpoint=tmp_path / "m.safetensors", host_pin_budget=0)
    assert "MiB of staged blocks stay in the checkpoint's pages" in caplog.text
    assert handle.stats()["mapped_bytes"] == handle.stats()["host_bytes"]
    _, model = _saved(tmp_path)

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")  # what mmap says on a file system that cannot map

    monkeypatch.setattr(ckpt.mmap, "mmap", refuse)
    with caplog.at_level(logging.WARNING, logger="fastvideo_offload"):
        handle = fo.enable(model, device="cpu", checkpoint=tmp_path / "m.safetensors", host_pin_budget=0)
    assert "cannot be mapped ([Errno 19] No such device)" in caplog.text
    assert handle.stats()["mapped_bytes"] == 0 and handle.stats()["staged_blocks"] == LAYERS
    assert torch.equal(run(model, [x])[0], run(reference, [x])[0])


def test_a_block_that_needs_a_cast_is_read_not_mapped(cpu_device, tmp_path):
    reference, _ = _saved(tmp_path)
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():
        model = TinyDiT(32, LAYERS).eval().to(torch.bfloat16)
    handle = fo.enable(model, device="cpu", checkpoint=tmp_path / "m.safetensors", host_pin_budget=0)
    assert handle.stats()["mapped_bytes"] == 0 and handle.stats()["staged_blocks"] == LAYERS
    x = tiny_input().to(torch.bfloat16)
    assert torch.equal(run(model, [x])[0], run(reference.to(torch.bfloat16), [x])[0])
