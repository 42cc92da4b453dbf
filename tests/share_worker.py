"""One rank of tests/test_share.py: a real process in a gloo group that offloads TinyDiT with
share="node" and writes what it saw to OUT/rank<R>.json (and its output to OUT/out<R>.pt).

    python tests/share_worker.py OUT MODE   (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the env)

MODE: run | plain (no share) | differ (rank 1 holds other weights) | stall-fill | stall-open
(that step waits for SIGKILL) | forever (forwards until OUT/stop exists) | already (rank 1's model
is enabled already, so its enable with share fails before the share's first step) | pin (a pin budget of
PINNED blocks); with a "checkpoint" prefix (checkpoint, checkpoint-pin, checkpoint-differ: rank 1
reads OUT/other.safetensors, checkpoint-stall-fill) the model is built empty and enabled from
OUT/model.safetensors, which the test wrote."""

import datetime
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from models import TinyDiT  # noqa: E402

import fastvideo_offload as fo  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from fastvideo_offload import share  # noqa: E402
from fastvideo_offload.store import BlockStore  # noqa: E402

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


def main(out: str, mode: str) -> None:
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
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
    try:
        handle = fo.enable(model, device="cpu", **kwargs)
    except Exception as exc:
        # What a failed enable leaves: the model as it was, and no hold on any shared memory.
        result["error"] = f"{type(exc).__name__}: {exc}"
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
    del output
    gc.collect()
    dist.barrier()  # every rank maps the store while each measures its share of it
    result.update(pss_before=pss_before, pss_after=pss(), store_pss=store_pss(), **handle.stats())
    dist.barrier()
    _write(out, rank, result)
    dist.destroy_process_group()


def _write(out: str, rank: int, result: dict) -> None:
    with open(f"{out}/rank{rank}.json.tmp", "w") as f:
        json.dump(result, f)
    os.replace(f"{out}/rank{rank}.json.tmp", f"{out}/rank{rank}.json")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
