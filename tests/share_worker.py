"""One rank of tests/test_share.py: a real process in a gloo group that offloads TinyDiT with
share="node" and writes what it saw to OUT/rank<R>.json (and its output to OUT/out<R>.pt).

    python tests/share_worker.py OUT MODE   (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the env)

MODE: run | plain (no share) | differ (rank 1 holds other weights) | stall-fill | stall-open
(that step waits for SIGKILL) | forever (forwards until OUT/stop exists)."""

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
from fastvideo_offload import share  # noqa: E402

DIM, LAYERS = 1024, 8  # 8 blocks of 50 MB: the interpreters' noise (a few MB each) stays well under 10%


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
    # The memory measurements need the large model; the failure tests only need processes.
    dim = DIM if mode in ("run", "plain") else 64
    x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # what a first forward loads belongs to the interpreter, not to the store
        TinyDiT(dim, 1)(x)
    gc.collect()
    dist.barrier()
    pss_before = pss()
    torch.manual_seed(1 if mode == "differ" and rank == 1 else 0)
    model = TinyDiT(dim, LAYERS).eval()
    if mode == "stall-fill" and rank == 0:
        share.SharedRegion.fill = stall(f"{out}/stalled")
    if mode == "stall-open" and rank == 1:
        share.SharedRegion.open = stall(f"{out}/stalled")
    before = {n: p.detach().clone() for n, p in model.named_parameters()} if mode.startswith(("differ", "stall")) else {}
    try:
        handle = fo.enable(model, device="cpu", share=None if mode == "plain" else "node")
    except Exception as exc:
        # What a failed enable leaves: the model as it was, and no hold on any shared memory.
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["model_unchanged"] = fo.handle_of(model) is None and all(
            torch.equal(p, before[n]) for n, p in model.named_parameters()
        )
        del exc
        gc.collect()
        result["holds_memfd"] = holds_memfd()
        _write(out, rank, result)
        return
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
