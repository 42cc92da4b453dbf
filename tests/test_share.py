"""enable(..., share="node"): ranks of a gloo group on one node map one host store. Each rank is a
real process (tests/support/share_worker.py); every launch is bounded in time and kills what it started."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file
from support.needs import requires_cuda
from support.models import TinyDiT

import fastvideo_offload as fo
from fastvideo_offload import share

#: Each rank runs this module from tests/, where `support` is found as it is here.
WORKER = "support.share_worker"
TESTS = os.path.dirname(os.path.abspath(__file__))
#: The ranks import the package this test imports (a worktree's, not an installed one).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(fo.__file__))
from support.share_worker import LAYERS, PINNED, dim_of  # noqa: E402


#: Four ranks prove the share's steps beyond a pair; the asynchronous pass runs the pair.
RANK_COUNTS = [2, pytest.param(4, marks=pytest.mark.sync_pass_only)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Ranks:
    """`n` worker processes; `wait` bounds them in time, and leaving kills whatever is left."""

    def __init__(self, tmp_path, n: int, mode: str, worker: str = WORKER):
        self.out = str(tmp_path)
        port = str(_free_port())
        self.procs = []
        for rank in range(n):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                       OMP_NUM_THREADS="1", PYTHONPATH=PACKAGE_ROOT,
                       # Freed tensors go back to the OS at once, so PSS shows what is live.
                       MALLOC_MMAP_THRESHOLD_="131072")
            log = open(f"{self.out}/log{rank}.txt", "w")
            self.procs.append(subprocess.Popen([sys.executable, "-m", worker, self.out, mode], cwd=TESTS, env=env,
                                               stdout=log, stderr=subprocess.STDOUT))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    def wait_for(self, path: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(f"{self.out}/{path}"):
            if time.monotonic() > deadline or all(p.poll() is not None for p in self.procs):
                raise AssertionError(f"{path} never appeared:\n{self.logs()}")
            time.sleep(0.05)

    def wait(self, timeout: float = 180) -> list[dict]:
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"ranks still running after {timeout} s:\n{self.logs()}") from None
        results = []
        for rank, p in enumerate(self.procs):
            path = f"{self.out}/rank{rank}.json"
            if os.path.exists(path):
                with open(path) as f:
                    results.append(json.load(f))
            else:
                results.append({"rank": rank, "exit": p.returncode})
        return results

    def logs(self) -> str:
        return "\n".join(open(path).read()[-3000:] for path in sorted(glob.glob(f"{self.out}/log*.txt")))


def _model(dim: int, seed: int = 0) -> TinyDiT:
    torch.manual_seed(seed)
    return TinyDiT(dim, LAYERS).eval()


def _write_checkpoints(tmp_path, mode: str) -> None:
    """What the checkpoint modes read: model.safetensors (the weights of seed 0, as the other modes
    build them) and other.safetensors (seed 1)."""
    save_file(_model(dim_of(mode)).state_dict(), f"{tmp_path}/model.safetensors")
    if mode == "checkpoint-differ":
        save_file(_model(dim_of(mode), seed=1).state_dict(), f"{tmp_path}/other.safetensors")


def _holders(pid: int) -> list[str]:
    """Processes that still map or hold the store a leader with `pid` created."""
    name = f"{share.MEMFD_NAME}:{pid}"
    found = []
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{proc}/maps") as f:
                if name in f.read():
                    found.append(proc)
                    continue
            if any(name in os.readlink(fd) for fd in glob.glob(f"{proc}/fd/*")):
                found.append(proc)
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


@pytest.fixture
def no_leftovers():
    """Nothing outlives the test: no /dev/shm entry that was not there before."""
    before = set(os.listdir("/dev/shm"))
    yield
    assert set(os.listdir("/dev/shm")) - before == set()


def _host_bytes_per_node(results) -> int:
    """The node's host memory for the model: each rank's PSS growth across enable and forwards,
    less its device slots (host memory only because the device is the CPU)."""
    return sum(r["pss_after"] - r["pss_before"] - r["device_bytes"] for r in results)


def _run_exact(tmp_path, n: int, mode: str) -> list[dict]:
    """`n` ranks in `mode`, each of whose two forwards gave the output of the model without offload
    computed in that rank's own process (a reference from this process would run on other threads,
    and differ in the last bits on some machines); the ranks, started alike, agree with each other."""
    with Ranks(tmp_path, n, mode) as ranks:
        results = ranks.wait()
    assert all("error" not in r and "exit" not in r for r in results), ranks.logs()
    first = torch.load(f"{tmp_path}/out0.pt")
    for rank, r in enumerate(results):
        assert r["equals_resident"] and r["second_equal"], r
        assert torch.equal(torch.load(f"{tmp_path}/out{rank}.pt"), first)
    return results


@pytest.mark.parametrize("n", RANK_COUNTS)
def test_ranks_share_one_store_bit_identical(tmp_path, n, no_leftovers):
    results = _run_exact(tmp_path, n, "run")
    store = results[0]["host_bytes"]
    node = _host_bytes_per_node(results)
    mapped = sum(r["store_pss"] for r in results)
    print(f"\n{n} ranks: store {store} B; node PSS growth less slots {node} B ({node / store:.3f} x the store), "
          f"of which the shared mapping {mapped} B ({mapped / store:.3f} x)")
    if os.environ.get("FASTVIDEO_OFFLOAD_CPU_TRANSFER") != "async":
        # The asynchronous device, a test instrument, keeps a host copy of each slot it releases:
        # a device's memory, which on the CPU lands in each rank's PSS and is no part of the store.
        assert node <= 1.1 * store
    assert _holders(results[0]["pid"]) == []


@pytest.mark.parametrize("n", RANK_COUNTS)
def test_ranks_share_one_store_read_from_a_checkpoint(tmp_path, n, no_leftovers):
    """enable(checkpoint=..., share="node"): the node's leader alone reads the blocks, straight
    into the shared store; the other ranks read only the headers and the weights outside the blocks."""
    _write_checkpoints(tmp_path, "checkpoint")
    results = _run_exact(tmp_path, n, "checkpoint")
    store = results[0]["host_bytes"]
    node = _host_bytes_per_node(results)
    reads = [r["read_bytes"] for r in results]
    print(f"\n{n} ranks from a checkpoint: store {store} B; node PSS growth less slots {node} B "
          f"({node / store:.3f} x the store); bytes read per rank {reads}")
    assert reads[0] >= 0.99 * store  # the store's padding between tensors is never read
    assert all(read <= 0.01 * store for read in reads[1:])
    if os.environ.get("FASTVIDEO_OFFLOAD_CPU_TRANSFER") != "async":
        assert node <= 1.1 * store  # as in the test above
    assert _holders(results[0]["pid"]) == []


@pytest.mark.parametrize("mode", ["pin", "checkpoint-pin"])
def test_shared_store_with_a_pin_budget_stages_the_rest(tmp_path, mode, no_leftovers):
    """Each rank pins the shared blocks within its budget and stages the others from the shared
    pages through its own staging ring: outputs exact, on both CPU devices."""
    if mode.startswith("checkpoint"):
        _write_checkpoints(tmp_path, mode)
    results = _run_exact(tmp_path, 2, mode)
    block = results[0]["host_bytes"] // LAYERS
    for r in results:
        assert (r["staged_blocks"], r["pinned_bytes"]) == (LAYERS - PINNED, PINNED * block)
        assert r["stagings"] == 2 * (LAYERS - PINNED)  # two forwards, each staged block once per forward
        assert r["staged_bytes"] == r["stagings"] * block


def test_without_share_each_rank_holds_a_copy(tmp_path):
    """The measurement above can see copies: without share=, 2 ranks hold about 2 stores."""
    with Ranks(tmp_path, 2, "plain") as ranks:
        results = ranks.wait()
    store = results[0]["host_bytes"]
    node = _host_bytes_per_node(results)
    print(f"2 ranks, no share: node PSS growth less slots {node} B ({node / store:.3f} x the store)")
    assert node >= 1.8 * store


def test_ranks_with_different_weights_refuse(tmp_path, no_leftovers):
    with Ranks(tmp_path, 2, "differ") as ranks:
        results = ranks.wait()
    for r in results:
        assert r.get("error", "").startswith("Refused: share: rank 1's weights differ from rank 0's"), r
        assert r["model_unchanged"] and not r["holds_memfd"]


def test_a_rank_refused_before_the_share_begins_tells_the_others(tmp_path, no_leftovers):
    """Rank 1's model is enabled already: it raises at once, and rank 0 learns it in the share's
    first step instead of waiting for rank 1 until the group's timeout."""
    with Ranks(tmp_path, 2, "already") as ranks:
        results = ranks.wait()
    assert results[1]["error"].startswith("RuntimeError: offload is already enabled"), results[1]
    # Timed inside the worker, from its enable: process start-up on a loaded machine does not count.
    assert results[0]["enable_seconds"] < 30, results[0]  # the workers' gloo timeout is 60 s
    assert results[0]["error"].startswith("RuntimeError: share: rank 1 of the group failed while describing its "
                                          "blocks: RuntimeError: offload is already enabled"), results[0]
    assert results[0]["model_unchanged"] and not results[0]["holds_memfd"]


def test_ranks_reading_different_checkpoints_refuse(tmp_path, no_leftovers):
    _write_checkpoints(tmp_path, "checkpoint-differ")
    with Ranks(tmp_path, 2, "checkpoint-differ") as ranks:
        results = ranks.wait()
    for r in results:
        assert r.get("error", "").startswith(
            "Refused: share: rank 1 reads its blocks from other checkpoint files (or other bytes of them) than rank 0"
        ), r
        assert r["model_unchanged"] and not r["holds_memfd"]


@pytest.mark.parametrize("killed, step", [(0, "stall-fill"), (0, "checkpoint-stall-fill"), (1, "stall-open")])
def test_sigkill_during_load_leaves_nothing(tmp_path, killed, step, no_leftovers):
    """The leader killed while it packs or reads the checkpoint, or a rank killed before it
    mapped: the survivor raises, its model as it was, and holds nothing; once it exits, no
    process holds the memory."""
    if step.startswith("checkpoint"):
        _write_checkpoints(tmp_path, step)
    with Ranks(tmp_path, 2, step) as ranks:
        ranks.wait_for("stalled")
        ranks.procs[killed].send_signal(signal.SIGKILL)
        results = ranks.wait()
    survivor = results[1 - killed]
    assert "error" in survivor, ranks.logs()
    assert survivor["model_unchanged"] and not survivor["holds_memfd"]
    assert _holders(ranks.procs[0].pid) == []


def test_sigkill_during_forward_leaves_nothing(tmp_path, no_leftovers):
    """The leader killed mid-forward: the other rank's mapping keeps the store, its outputs stay
    exact; once it exits, nothing holds the memory."""
    with Ranks(tmp_path, 2, "forever") as ranks:
        ranks.wait_for("ready0")
        ranks.wait_for("ready1")
        ranks.procs[0].send_signal(signal.SIGKILL)
        ranks.procs[0].wait(30)
        time.sleep(0.5)  # rank 1 runs forwards from the store alone
        assert _holders(ranks.procs[0].pid) == [f"/proc/{ranks.procs[1].pid}"]
        open(f"{tmp_path}/stop", "w").close()
        results = ranks.wait()
    assert results[1]["still_equal"], ranks.logs()
    assert _holders(ranks.procs[0].pid) == []


def test_open_after_the_leader_died_is_a_clear_error():
    code = ("import os, sys; fd = os.memfd_create('x'); os.ftruncate(fd, 4096); "
            "print(fd, os.fstat(fd).st_ino, flush=True); sys.stdin.read()")
    leader = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        fd, inode = map(int, leader.stdout.readline().split())
        region = share.SharedRegion([0], [4096])
        region.open(0, leader.pid, fd, inode)  # alive: it opens
        region.release()
    finally:
        leader.kill()
        leader.wait(10)
    with pytest.raises(RuntimeError, match=rf"rank 0 \(pid {leader.pid}\) is gone: that process exited"):
        share.SharedRegion([0], [4096]).open(0, leader.pid, fd, inode)


def test_bad_share_arguments_leave_the_model_alone(monkeypatch):
    model = TinyDiT()
    with pytest.raises(ValueError, match="share: expected 'node'"):
        fo.enable(model, device="cpu", share="nodes")
    with pytest.raises(TypeError, match="share: expected 'node', a ProcessGroup or None, got int"):
        fo.enable(model, device="cpu", share=2)
    # FastVideo's tests, earlier in the same process, leave a default group behind.
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="default process group, which is not initialized"):
        fo.enable(model, device="cpu", share="node")
    assert fo.handle_of(model) is None and all(p.device.type == "cpu" and p.numel() for p in model.parameters())


@requires_cuda
@pytest.mark.parametrize("pinned_blocks", [None, 2])
def test_cuda_store_is_pinned_in_place(tmp_path, pinned_blocks):
    """One rank on CUDA: the mapping's blocks are registered (pinned) in place, all of them or those
    within a pin budget (the others staged from the shared pages), and outputs are exact."""
    import torch.distributed as dist

    from fastvideo_offload.store import BlockStore

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = TinyDiT().eval()
        x = torch.randn(1, 16, 8)
        block = BlockStore.nbytes(list(model.blocks[0].parameters()))
        budget = None if pinned_blocks is None else pinned_blocks * block
        pinned = len(model.blocks) if pinned_blocks is None else pinned_blocks
        with torch.no_grad():
            expected = model.cuda()(x.cuda())
            model.cpu()
            handle = fo.enable(model, device="cuda", share="node", host_pin_budget=budget)
            assert [store.buffer.is_pinned() for store in handle._stores] == [i < pinned for i in range(4)]
            assert [store.staged for store in handle._stores] == [i >= pinned for i in range(4)]
            for _ in range(3):
                assert torch.equal(model(x.cuda()), expected)
        handle.disable()
    finally:
        dist.destroy_process_group()


def _run_change(tmp_path, n: int, mode: str, timeout: float = 120) -> list[dict]:
    with Ranks(tmp_path, n, mode) as ranks:
        results = ranks.wait(timeout=timeout)
    assert all("checks" in r for r in results), ranks.logs()
    return results


@pytest.mark.parametrize("n", RANK_COUNTS)
def test_a_change_of_a_shared_store_is_made_once_per_node(tmp_path, n, no_leftovers):
    """Every rank mutates (the issue's `add_(0.5)` on every block, then block by block) and loads a
    state dict; the ranks but the leader arrive later, running forwards meanwhile. Each change is
    written once, by the node's leader, after every rank has arrived: every forward before it sees
    the old weights, and afterwards weights and outputs are bit-identical to a resident model
    changed alike (not W + 1.0). The other ranks map the store read-only, and what state_dict()
    hands out refuses writes on every rank (a write there would be SIGSEGV on a follower)."""
    results = _run_change(tmp_path, n, "change")
    assert all(all(r["checks"].values()) for r in results), [r["checks"] for r in results]
    for r in results:
        assert r["maps"] == ("rw-s" if r["rank"] == 0 else "r--s"), r
        for how, error in r["refused"].items():
            expected = "ValueError: assignment destination is read-only" if how == "numpy" else "RuntimeError: "
            assert error is not None and error.startswith(expected), (how, error)
            assert how == "numpy" or "shared host store" in error, (how, error)


@pytest.mark.parametrize("lone", [0, 1])
def test_a_rank_that_changes_a_shared_store_alone_gets_an_error(tmp_path, lone, no_leftovers):
    """The leader (0) or a follower (1) mutates while the other rank does not: it raises after
    share.CHANGE_TIMEOUT (3 s in the worker, well under the group's 60 s), its next change refuses at
    once, and the other rank's change, made later, raises at once too; nothing was written."""
    results = _run_change(tmp_path, 2, f"alone{lone}", timeout=50)
    alone, late = results[lone], results[1 - lone]
    assert alone["alone"].startswith(f"RuntimeError: share: rank {lone} gave up on mutate"), alone
    assert "did not join it within share.CHANGE_TIMEOUT (3 s)" in alone["alone"] and 3 <= alone["alone_s"] < 10, alone
    assert alone["again"].startswith(f"RuntimeError: share: rank {lone} gave up on mutate") and alone["again_s"] < 1
    assert late["late"].startswith(f"RuntimeError: share: rank {1 - lone} gave up on mutate"), late
    assert late["late_s"] < 10, late
    assert alone["checks"]["unchanged"] and late["checks"]["unchanged"], results


def test_ranks_whose_changes_differ_change_nothing(tmp_path, no_leftovers):
    """Ranks that add different amounts, a rank whose change raises, ranks in different changes:
    every rank raises, nothing is written, and the next change on which they agree goes through."""
    results = _run_change(tmp_path, 2, "disagree")
    assert all(all(r["checks"].values()) for r in results), [r["checks"] for r in results]
    for r in results:
        assert r["different"].startswith("RuntimeError: share: rank 1's mutate changes blocks.0.qkv.weight otherwise "
                                         "than rank 0's, its node's leader"), r
        assert r["other_change"].startswith("RuntimeError: share: rank 1 is in load_state_dict of blocks.0.norm, "
                                            "rank 0 in mutate"), r
    assert results[1]["failed"] == "ValueError: planned failure inside mutate"
    assert results[0]["failed"].startswith("RuntimeError: share: rank 1 of the group failed in mutate, which every "
                                           "rank makes together: ValueError: planned failure inside mutate; nothing "
                                           "was changed on any rank"), results[0]
