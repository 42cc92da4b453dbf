"""One rank of tests/test_share.py: a real process in a gloo group that offloads TinyDiT with
share="node" and writes what it saw to OUT/rank<R>.json (and its output to OUT/out<R>.pt).

    cd tests && python -m support.share_worker OUT MODE
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the env)

MODE: run | plain (no share) | differ (rank 1 holds other weights) | stall-fill | stall-open
(that step waits for SIGKILL) | forever (forwards until OUT/stop exists) | already (rank 1's model
is enabled already, so its enable with share fails before the share's first step) | pin (a pin budget of
PINNED blocks); with a "checkpoint" prefix (checkpoint, checkpoint-pin, checkpoint-differ: rank 1
reads OUT/other.safetensors, checkpoint-stall-fill) the model is built empty and enabled from
OUT/model.safetensors, which the test wrote.

Changes of the shared store (`change_main`), each compared with a resident TinyDiT changed alike in
this process: change (mutate and load_state_dict on every rank, the other ranks reaching each one
later while running forwards; state_dict's tensors refusing writes) | alone0, alone1 (that rank
mutates alone; the other one tries once it gave up) | disagree (ranks whose changes differ or fail)."""

import contextlib
import copy
import datetime
import gc
import io
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from accelerate import init_empty_weights

import fastvideo_offload as fo
from fastvideo_offload import share
from fastvideo_offload.store import BlockStore

from .models import TinyDiT

DIM, LAYERS = 1024, 8  # 8 blocks of 50 MB: the interpreters' noise (a few MB each) stays well under 10%
SMALL = 64  # the width where only behaviour is checked, not memory
PINNED = 3


def dim_of(mode: str) -> int:
    """The memory measurements need the large model; the other modes only need processes."""
    return DIM if mode in ("run", "plain", "checkpoint") else SMALL


def read_bytes() -> int:
    """Bytes this process has read through read/pread calls so far (/proc/self/io's rchar)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def pss() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))


def store_pss() -> int:
    """This process's share of the shared store alone (its mapping's Pss in /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                inside = share.MEMFD_NAME in line
            elif inside and line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
    return total


def holds_memfd() -> bool:
    """Whether this process maps or holds a descriptor of a shared store."""
    with open("/proc/self/maps") as f:
        if share.MEMFD_NAME in f.read():
            return True
    for fd in os.listdir("/proc/self/fd"):
        try:
            if share.MEMFD_NAME in os.readlink(f"/proc/self/fd/{fd}"):
                return True
        except OSError:
            pass
    return False


def stall(marker: str):
    def wait(*args, **kwargs):
        open(marker, "w").close()
        time.sleep(600)

    return wait


CHANGES = ("change", "alone0", "alone1", "disagree")


def main(out: str, mode: str) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    if mode in CHANGES:
        _write(out, rank, change_main(out, mode, rank))
        dist.destroy_process_group()
        return
    result = {"rank": rank, "pid": os.getpid()}
    dim = dim_of(mode)
    from_checkpoint = mode.startswith("checkpoint")
    base = mode.removeprefix("checkpoint-") if from_checkpoint else mode
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # what a first forward loads belongs to the interpreter, not to the store
        TinyDiT(dim, 1)(x)
    gc.collect()
    dist.barrier()
    pss_before = pss()
    kwargs = {"share": None if mode == "plain" else "node"}
    if from_checkpoint:
        with init_empty_weights():  # its buffers stay real: checkpoints do not hold them
            model = TinyDiT(dim, LAYERS).eval()
        kwargs["checkpoint"] = f"{out}/{'other' if base == 'differ' and rank == 1 else 'model'}.safetensors"
    else:
        torch.manual_seed(1 if mode == "differ" and rank == 1 else 0)
        model = TinyDiT(dim, LAYERS).eval()
    if base == "pin":
        kwargs["host_pin_budget"] = PINNED * BlockStore.nbytes(list(model.blocks[0].parameters()))
    if base == "stall-fill" and rank == 0:
        share.SharedRegion.fill = stall(f"{out}/stalled")
    if mode == "stall-open" and rank == 1:
        share.SharedRegion.open = stall(f"{out}/stalled")
    if mode == "already" and rank == 1:
        fo.enable(model, device="cpu")
    failing = base.startswith(("differ", "stall", "already"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()} if failing else {}
    read_before = read_bytes()
    started = time.monotonic()
    try:
        handle = fo.enable(model, device="cpu", **kwargs)
    except Exception as exc:
        # What a failed enable leaves: the model as it was, and no hold on any shared memory.
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["enable_seconds"] = time.monotonic() - started
        result["model_unchanged"] = fo.handle_of(model) is None and all(
            p.is_meta if from_checkpoint else torch.equal(p, before[n]) for n, p in model.named_parameters()
        )
        del exc
        gc.collect()
        result["holds_memfd"] = holds_memfd()
        _write(out, rank, result)
        return
    result["read_bytes"] = read_bytes() - read_before
    with torch.no_grad():
        output = model(x)
        torch.save(output, f"{out}/out{rank}.pt")
        if mode == "forever":
            open(f"{out}/ready{rank}", "w").close()
            while not os.path.exists(f"{out}/stop"):
                result["still_equal"] = torch.equal(model(x), output)
            _write(out, rank, result)
            return
        result["second_equal"] = torch.equal(model(x), output)
    gc.collect()
    dist.barrier()  # every rank maps the store while each measures its share of it
    result.update(pss_before=pss_before, pss_after=pss(), store_pss=store_pss(), **handle.stats())
    dist.barrier()
    # The model without offload, in this process: the same numerics (threads, kernels) as the
    # offloaded forward, whatever the machine. The checkpoint holds these weights (seed 0).
    torch.manual_seed(0)
    with torch.no_grad():
        result["equals_resident"] = torch.equal(output, TinyDiT(dim, LAYERS).eval()(x))
    _write(out, rank, result)
    dist.destroy_process_group()


class Pair:
    """An offloaded TinyDiT (share="node") and the same model resident in this process, changed alike."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = TinyDiT(SMALL, LAYERS).eval()
        torch.manual_seed(0)
        self.reference = TinyDiT(SMALL, LAYERS).eval()
        self.handle = fo.enable(self.model, device="cpu", share="node")
        self.x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(7))

    def same(self) -> bool:
        """Outputs (two forwards) and every weight bit-identical to the resident model's."""
        with torch.no_grad():
            expected = self.reference(self.x)
            outputs = all(torch.equal(self.model(self.x), expected) for _ in range(2))
        mine, theirs = self.model.state_dict(), self.reference.state_dict()
        return outputs and mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)

    def later(self, rank: int) -> bool:
        """Ranks other than 0 reach the next change later, running forwards meanwhile: whether each
        of those forwards gave the resident model's output, the weights as they were."""
        with torch.no_grad():
            expected = self.reference(self.x)
            deadline, runs, equal = time.monotonic() + 0.5 * rank, 0, True
            while rank and (time.monotonic() < deadline or runs < 3):
                equal &= torch.equal(self.model(self.x), expected)
                runs += 1
        return equal


def _error(fn) -> str | None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 (what the test looks at)
        return f"{type(exc).__name__}: {exc}"
    return None


def _timed(fn) -> tuple[str | None, float]:
    start = time.monotonic()
    error = _error(fn)
    return error, time.monotonic() - start


def _maps_store() -> str:
    """The permissions of this process's mapping of the shared store (/proc/self/maps: r--s or rw-s)."""
    with open("/proc/self/maps") as f:
        return " ".join(line.split()[1] for line in f if share.MEMFD_NAME in line)


@contextlib.contextmanager
def _slow_writes(rank: int):
    """The leader's writes take half a second, as a large change's would: the other ranks must not
    read the pages before it is done."""
    if rank != 0:
        yield
        return
    change = share.NodeShare.change

    def slowly(self, what, digest, write=None, failed=None):
        def slow_write():
            time.sleep(0.5)
            write()

        return change(self, what, digest, write and slow_write, failed)

    share.NodeShare.change = slowly
    try:
        yield
    finally:
        share.NodeShare.change = change


def change_main(out: str, mode: str, rank: int) -> dict:
    if mode.startswith("alone"):
        share.CHANGE_TIMEOUT = datetime.timedelta(seconds=3)
    pair = Pair()
    model, reference, handle = pair.model, pair.reference, pair.handle
    blocks = list(zip(model.blocks, reference.blocks))
    result = {"rank": rank, "maps": _maps_store(), "checks": {"before": pair.same()}}
    checks = result["checks"]

    def add(amount):
        def change():
            with handle.mutate(), torch.no_grad():
                for block in model.blocks:
                    block.qkv.weight.add_(amount)
        return change

    if mode == "change":
        # The change, on every rank: all blocks in one mutate; the leader's write is slow.
        checks["waited_in_forwards"] = pair.later(rank)
        with _slow_writes(rank):
            add(0.5)()
        with torch.no_grad():
            for block in reference.blocks:
                block.qkv.weight.add_(0.5)
        checks["mutate"] = pair.same()
        # One block at a time, as FastVideo's LoRA merge goes.
        for mine, theirs in blocks:
            with handle.mutate(mine), torch.no_grad():
                mine.mlp[0].weight.mul_(1.5)
            with torch.no_grad():
                theirs.mlp[0].weight.mul_(1.5)
        checks["mutate_per_block"] = pair.same()
        torch.manual_seed(1)
        other = TinyDiT(SMALL, LAYERS).state_dict()
        checks["waited_in_forwards_to_load"] = pair.later(rank)
        model.load_state_dict(other)
        reference.load_state_dict(other)
        checks["load_state_dict"] = pair.same()
        # What state_dict hands out views the shared pages: writes into it raise, on every rank.
        sd = model.state_dict()
        key = "blocks.0.qkv.weight"
        result["refused"] = {
            "add_": _error(lambda: sd[key].add_(1)),
            "setitem": _error(lambda: sd[key].__setitem__(0, 0.0)),
            "copy_": _error(lambda: sd[key].copy_(torch.zeros_like(sd[key]))),
            "out": _error(lambda: torch.mul(sd[key], 2, out=sd[key])),
            "view": _error(lambda: sd[key].view(-1)[:3].zero_()),
            "numpy": _error(lambda: sd[key].numpy().__setitem__(0, 1.0)),
        }
        buffer = io.BytesIO()
        torch.save(sd, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        copied = copy.deepcopy(sd)
        copied[key].add_(1)  # a copy in this process's memory: writable, and not the model
        checks["saved_and_copied"] = (all(type(v) is torch.Tensor and torch.equal(v, sd[k]) for k, v in saved.items())
                                      and type(copied[key]) is torch.Tensor)
        checks["after_refusals"] = pair.same()
    elif mode == "disagree":
        # Ranks that change different amounts: refused on every rank, nothing written.
        result["different"] = _error(add(0.5 * (rank + 1)))
        checks["after_different"] = pair.same()

        def fail():
            with handle.mutate():
                if rank == 1:
                    raise ValueError("planned failure inside mutate")
        result["failed"] = _error(fail)
        checks["after_failed"] = pair.same()
        # One rank mutates while the other loads a state dict (of block weights: torch itself loads
        # the others, each rank its own, as it reaches them).
        torch.manual_seed(1)
        other = {k: v for k, v in TinyDiT(SMALL, LAYERS).state_dict().items() if k.startswith("blocks.")}
        result["other_change"] = _error(add(0.5) if rank == 0 else lambda: model.load_state_dict(other))
        checks["after_other_change"] = pair.same()
        # The ranks still agree on every change: the same one on both goes through.
        add(0.25)()
        with torch.no_grad():
            for block in reference.blocks:
                block.qkv.weight.add_(0.25)
        checks["after_agreeing"] = pair.same()
    else:
        lone = int(mode[-1])
        if rank == lone:
            result["alone"], result["alone_s"] = _timed(add(0.5))
            result["again"], result["again_s"] = _timed(lambda: model.load_state_dict(reference.state_dict()))
            open(f"{out}/gave_up", "w").close()
            _wait_for(f"{out}/late_done")
        else:
            _wait_for(f"{out}/gave_up")
            result["late"], result["late_s"] = _timed(add(0.5))
            open(f"{out}/late_done", "w").close()
        checks["unchanged"] = pair.same()
    return result


def _wait_for(path: str, timeout: float = 50) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def _write(out: str, rank: int, result: dict) -> None:
    with open(f"{out}/rank{rank}.json.tmp", "w") as f:
        json.dump(result, f)
    os.replace(f"{out}/rank{rank}.json.tmp", f"{out}/rank{rank}.json")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
