"""Faults, long runs and concurrency: an offloader sits under every forward of a long
generation, so one leaked block or byte per step, or one wrong weight after a fault, matters."""

import copy
import gc
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import fastvideo_offload as fo
from support.models import TinyDiT, tiny_input
from support.offloaded import assert_dropping_frees_the_engine
from support.snapshot import assert_unchanged, snapshot

#: The subprocess imports the package this test imports (a worktree's, not an installed one), and
#: the tests' support package.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(fo.__file__))
TESTS = os.path.dirname(os.path.abspath(__file__))


def run(model, x):
    with torch.no_grad():
        return model(x)


def materialized(model):
    return [b for b in model.blocks if any(p.numel() > 0 for p in b.parameters())]


def test_fault_inside_a_block_leaves_nothing_behind():
    """Looked at right after the fault, before any other forward could clean up: the failing block
    was left (its always-called post-hook), no weight is on the device outside a forward."""
    model = TinyDiT()
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cpu", prefetch=2)
    x = tiny_input()

    def fail(block):
        raise RuntimeError("stop")

    model.blocks[2].probe = fail
    with pytest.raises(RuntimeError, match="stop"):
        run(model, x)
    assert materialized(model) == []
    stats = handle.stats()
    assert stats["running_blocks"] == 0 and stats["max_materialized_blocks"] == 1
    assert stats["device_bytes"] <= 3 * stats["slot_bytes"]
    model.blocks[2].probe = None
    assert torch.equal(run(model, x), run(reference, x))
    handle.disable()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("then", ["forward", "trim", "disable"])
def test_an_interrupted_forward_leaves_its_block_to_the_next_call(then):
    """KeyboardInterrupt skips even torch's always-called post-hooks, so the interrupted block stays
    entered; the next forward, trim or disable releases it (no error, nothing left on the device)."""
    model = TinyDiT()
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cpu", prefetch=2)
    x = tiny_input()

    def interrupt(block):
        raise KeyboardInterrupt

    model.blocks[2].probe = interrupt
    with pytest.raises(KeyboardInterrupt):
        run(model, x)
    model.blocks[2].probe = None
    assert materialized(model) == [model.blocks[2]] and handle.stats()["running_blocks"] == 1
    if then == "forward":
        assert torch.equal(run(model, x), run(reference, x))
    else:
        getattr(handle, then)()
    assert materialized(model) == ([] if then != "disable" else list(model.blocks))
    if then != "disable":
        assert handle.stats()["running_blocks"] == 0
        handle.disable()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_trim_inside_a_running_block_is_refused():
    """The release above is only for a forward that no thread is running any more."""
    model = TinyDiT()
    handle = fo.enable(model, device="cpu")
    errors = []

    def trim(block):
        try:
            handle.trim()
        except RuntimeError as exc:
            errors.append(str(exc))

    model.blocks[1].probe = trim
    run(model, tiny_input())
    assert errors == ["trim: a block is running; call it between forward passes"]


def test_an_interrupted_forward_leaves_nothing_at_exit():
    """A model dropped (or the interpreter leaving) with an interrupted block: the engine goes
    without an error printed at exit."""
    code = textwrap.dedent("""
        import torch, fastvideo_offload as fo
        from support.models import TinyDiT, tiny_input
        model = TinyDiT()
        fo.enable(model, device="cpu")
        def interrupt(block):
            raise KeyboardInterrupt
        model.blocks[1].probe = interrupt
        try:
            with torch.no_grad():
                model(tiny_input())
        except KeyboardInterrupt:
            print("interrupted")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, TESTS])))
    assert proc.returncode == 0 and proc.stdout.strip() == "interrupted", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]


def test_prefetch_without_device_memory_falls_back_to_synchronous_loads():
    model = TinyDiT(layers=5)
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cpu", prefetch=2)
    slot = handle.stats()["slot_bytes"]
    handle.limit_device_memory(slot)  # room for one block: every prefetch fails to get memory
    x = tiny_input()
    for _ in range(3):
        assert torch.equal(run(model, x), run(reference, x))
    stats = handle.stats()
    assert stats["device_bytes"] == slot
    assert stats["prefetches_skipped"] > 0
    assert stats["sync_loads"] == 15  # every block loaded when it had to run
    handle.limit_device_memory(2 * slot)  # memory comes back: prefetching resumes
    run(model, x)
    run(model, x)
    assert handle.stats()["sync_loads"] <= 15 + 5 + 1


def test_block_that_cannot_get_memory_raises_and_recovers():
    model = TinyDiT()
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cpu")
    run(model, tiny_input())  # slots allocated
    handle.trim()
    handle.limit_device_memory(100)  # less than one block
    with pytest.raises(torch.OutOfMemoryError, match="no device memory for one block"):
        run(model, tiny_input())
    assert materialized(model) == []
    handle.limit_device_memory(None)
    x = tiny_input()
    assert torch.equal(run(model, x), run(reference, x))
    handle.disable()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="byte count"):
        fo.enable(TinyDiT(), device="cpu").limit_device_memory(-5)


def test_two_models_from_two_threads():
    models = [TinyDiT(), TinyDiT()]
    references = [copy.deepcopy(m) for m in models]
    for m in models:
        fo.enable(m, device="cpu")
    inputs = [tiny_input() for _ in range(4)]
    expected = [[run(r, x) for x in inputs] for r in references]
    errors = []

    def work(i):
        try:
            for _ in range(25):
                for x, e in zip(inputs, expected[i]):
                    assert torch.equal(run(models[i], x), e)
        except BaseException as exc:  # noqa: BLE001  (reported to the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_a_thousand_forwards_hold_their_memory():
    model = TinyDiT(dim=64, layers=6)
    handle = fo.enable(model, device="cpu", prefetch=1)
    x = tiny_input()
    for _ in range(20):
        run(model, x)
    gc.collect()
    start = _rss_bytes()
    for _ in range(1000):
        run(model, x)
    gc.collect()
    grown = _rss_bytes() - start
    # The bound: 1 MiB over 1000 forwards, about 1 KiB a forward (allocator noise), against a
    # block of 130 KiB: a leaked block or buffer per step would be 130 MiB.
    assert grown < (1 << 20), grown
    stats = handle.stats()
    assert stats["enters"] == 6 * 1020
    assert stats["device_bytes"] == 2 * stats["slot_bytes"]


def test_deleting_the_model_frees_its_engine_without_a_gc_pass():
    """No reference cycle between a model and its handle: dropping the model releases the engine
    (slots, host store) at once, as dropping a model without offload would."""
    model = TinyDiT()
    fo.enable(model, device="cpu")
    run(model, tiny_input())
    engine = fo.handle_of(model)._engine
    assert fo._ops.engine_stats(engine)["device_slots"] > 0
    models = [model]
    del model
    assert_dropping_frees_the_engine(models)


def test_trim_disable_and_del_right_after_a_forward():
    """Slots freed right after a forward, while (on the asynchronous device, as on a GPU) the last
    release and the prefetch that wraps into the next step may still be in flight; the memory
    is then reused at once."""
    reference = TinyDiT()
    x = tiny_input()
    expected = run(reference, x)
    model = copy.deepcopy(reference)
    handle = fo.enable(model, device="cpu")
    for _ in range(10):
        out = run(model, x)
        handle.trim()
        reuse = [torch.full((handle.stats()["slot_bytes"],), 7, dtype=torch.uint8) for _ in range(2)]
        assert torch.equal(out, expected) and all(bool((r == 7).all()) for r in reuse)
    run(model, x)
    handle.disable()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    for _ in range(3):
        model = copy.deepcopy(reference)
        fo.enable(model, device="cpu")
        assert torch.equal(run(model, x), expected)
        del model


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
@pytest.mark.parametrize("fail_at", [0, 2])
def test_failed_enable_leaves_every_tensor_where_it_was(monkeypatch, error, fail_at):
    """A host allocation that fails part-way (a cgroup limit) leaves the model as it was and says
    how many bytes enable asked for and had obtained."""
    model = TinyDiT(layers=4)
    reference = copy.deepcopy(model)
    before = snapshot(model)
    sizes = [fo.store.BlockStore.nbytes(list(b.parameters())) for b in model.blocks]
    real_pack, packed = fo._ops.pack, []

    def pack(*args):
        if len(packed) == fail_at:
            raise error("could not allocate 123 bytes: out of memory")
        packed.append(args[2])
        return real_pack(*args)

    monkeypatch.setattr(fo._ops, "pack", pack)
    with pytest.raises(error) as info:
        fo.enable(model, device="cpu")
    message = str(info.value)
    obtained, total = sum(sizes[:fail_at]), sum(sizes)
    assert f"packing block blocks.{fail_at} failed after obtaining {obtained} of the {total} bytes" in message
    assert "of host memory" in message and "Free host memory" in message and "out of memory" in message
    assert_unchanged(model, before, moved=[f"blocks.{i}." for i in range(fail_at)])
    monkeypatch.undo()
    fo.enable(model, device="cpu")
    x = tiny_input()
    assert torch.equal(run(model, x), run(reference, x))


def test_failure_that_is_not_an_allocation_keeps_its_message(monkeypatch):
    model = TinyDiT()
    before = snapshot(model)
    monkeypatch.setattr(fo._ops, "pack", lambda *args: (_ for _ in ()).throw(ValueError("pack: bad layout")))
    with pytest.raises(ValueError, match=r"^pack: bad layout$"):
        fo.enable(model, device="cpu")
    assert_unchanged(model, before)


def test_failure_after_every_block_was_packed_restores_them_all(monkeypatch):
    """The last step of enable fails: every block was packed and hooked, and comes back."""
    model = TinyDiT()
    before = snapshot(model)

    def fail(*args):
        raise RuntimeError("injected")

    monkeypatch.setattr(fo.offloader, "attach_state_dict_hooks", fail)
    with pytest.raises(RuntimeError, match="injected"):
        fo.enable(model, device="cpu")
    assert_unchanged(model, before, moved=["blocks."])


@pytest.mark.parametrize("fail_at", [0, 7])
def test_failed_disable_leaves_the_model_offloaded_and_working(monkeypatch, fail_at):
    """Copying the weights back runs out of device memory on the Nth parameter: nothing changed,
    the model still runs offloaded, bit-identical, and a later disable restores every weight."""
    model = TinyDiT()
    reference = copy.deepcopy(model)
    x = tiny_input()
    expected = run(reference, x)
    handle = fo.enable(model, device="cpu")
    assert torch.equal(run(model, x), expected)
    real, copies = fo.offloader._on_device, []

    def on_device(view, device):
        if len(copies) == fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 KiB")
        copies.append(real(view, device))
        return copies[-1]

    monkeypatch.setattr(fo.offloader, "_on_device", on_device)
    with pytest.raises(torch.OutOfMemoryError, match=r"^disable failed .*; the model is still offloaded and works; "
                       r".*Cause: CUDA out of memory"):
        handle.disable()
    monkeypatch.undo()
    assert len(copies) == fail_at
    assert handle.enabled and fo.handle_of(model) is handle and materialized(model) == []
    assert torch.equal(run(model, x), expected)
    handle.disable()
    assert fo.handle_of(model) is None
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        assert p.stride() == r.stride() and torch.equal(p, r), name
    assert torch.equal(run(model, x), expected)


def test_mutate_that_cannot_copy_a_weight_to_the_device_changes_nothing(monkeypatch):
    model = TinyDiT()
    reference = copy.deepcopy(model)
    x = tiny_input()
    expected = run(reference, x)
    handle = fo.enable(model, device="cpu")
    real, copies = fo.offloader._on_device, []

    def on_device(view, device):
        if len(copies) == 7:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 KiB")
        copies.append(real(view, device))
        return copies[-1]

    monkeypatch.setattr(fo.offloader, "_on_device", on_device)
    with pytest.raises(torch.OutOfMemoryError), handle.mutate():
        pytest.fail("the scope must not be entered")
    monkeypatch.undo()
    assert len(copies) == 7 and materialized(model) == []
    assert torch.equal(run(model, x), expected)
