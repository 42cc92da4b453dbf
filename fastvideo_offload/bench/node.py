"""Node: host bytes per node when 1, 2 or 4 ranks (real processes in a gloo group) offload one
model, with `share="node"` (one store per node; from each rank's loaded weights, and from a
checkpoint that the node's leader alone reads) and without (a store per rank, as FastVideo's own
offload keeps). Measured as the sum of the ranks' PSS growth (/proc/self/smaps_rollup) across
building, enabling and one forward, less what is not the host store on a GPU machine: each rank's
device slots and the weights outside the blocks (here the device is the CPU). The model is small
enough for a CPU, on every machine: this measures host memory only.

    python -m fastvideo_offload.bench.node OUT WAY SHAPE_JSON   (one rank; RANK, WORLD_SIZE from the env)
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from .. import api
from . import measure, modes
from .model import CPU_SMALL, WanShape, build, build_empty, inputs

#: About 127 MB in fp32: a store far above each interpreter's few MB of noise.
SHAPE = CPU_SMALL
DTYPE = torch.float32
RANKS = (1, 2, 4)
TOKENS = 16
TIMEOUT_S = 180
#: How the ranks enable: the row's columns.
WAYS = ("shared", "checkpoint", "unshared")


def compare(ranks: tuple[int, ...], out_of_time) -> dict:
    store = sum(modes.block_sizes(build_empty(SHAPE, DTYPE)))
    section = {"shape": SHAPE.as_dict(), "dtype": str(DTYPE).removeprefix("torch."), "store_bytes": store,
               "ranks": {}}
    for n in ranks:
        row = section["ranks"][str(n)] = {}
        for key in WAYS:
            if out_of_time():
                row[key] = {"skipped": "time limit"}
                continue
            try:
                per_rank = launch(n, key)
            except Exception as exc:  # noqa: BLE001  (one launch failing must not cost the others)
                row[key] = {"skipped": f"failed: {type(exc).__name__}: {exc}"[:500]}
                continue
            node = sum(r["host_bytes"] for r in per_rank)
            row[key] = {"node_bytes": node, "x_store": node / store, "per_rank": per_rank}
    return section


def launch(n: int, way: str) -> list[dict]:
    """Runs `n` ranks enabling one of the WAYS to the end, within TIMEOUT_S, and returns what each
    measured; whatever is still running when it leaves is killed."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory(prefix="fastvideo_offload-node-") as out:
        if way == "checkpoint":
            torch.manual_seed(0)
            save_file(build(SHAPE, DTYPE).state_dict(), f"{out}/model.safetensors")
        procs = []
        try:
            for rank in range(n):
                env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(n), OMP_NUM_THREADS="1",
                           # The ranks import the package the bench runs from.
                           PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
                           # Freed tensors go back to the OS at once, so PSS shows what is live.
                           MALLOC_MMAP_THRESHOLD_="131072")
                # The synchronous CPU device: the asynchronous one, a test instrument, keeps a host
                # copy of each slot it releases, which is no part of what a node holds on a GPU.
                env.pop("FASTVIDEO_OFFLOAD_CPU_TRANSFER", None)
                with open(f"{out}/log{rank}.txt", "w") as log:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "fastvideo_offload.bench.node", out, way,
                         json.dumps(SHAPE.as_dict())], env=env, stdout=log, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + TIMEOUT_S
            for p in procs:
                p.wait(max(1.0, deadline - time.monotonic()))
            results = []
            for rank, p in enumerate(procs):
                if not os.path.exists(f"{out}/rank{rank}.json"):
                    with open(f"{out}/log{rank}.txt") as f:
                        raise RuntimeError(f"rank {rank} exited {p.returncode}: {f.read()[-300:]}")
                with open(f"{out}/rank{rank}.json") as f:
                    results.append(json.load(f))
            return results
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()


def _settle() -> None:
    """Frees what is garbage and gives malloc's free pages back to the OS, so that PSS counts
    what is live, not what the allocator keeps for later."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)


def rank_main(out: str, way: str, shape: WanShape) -> None:
    rank = int(os.environ["RANK"])
    # A file store in the launch's own directory: no port to pick, gone with the directory.
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank,
                            world_size=int(os.environ["WORLD_SIZE"]), timeout=datetime.timedelta(seconds=60))
    x = inputs(shape, TOKENS, DTYPE, "cpu")
    with torch.inference_mode():  # what a first forward loads belongs to the interpreter, not to the store
        build(replace(shape, layers=1), DTYPE)(*x)
    # So does what building on the meta device loads (torch's meta kernels import torch._dynamo).
    build_empty(replace(shape, layers=1), DTYPE)
    _settle()
    dist.barrier()
    before = measure.proc_bytes("Pss:", table="smaps_rollup")
    if way == "checkpoint":
        model = build_empty(shape, DTYPE)
        handle = api.enable(model, device="cpu", share="node", checkpoint=f"{out}/model.safetensors")
    else:
        torch.manual_seed(0)
        model = build(shape, DTYPE)
        handle = api.enable(model, device="cpu", share="node" if way == "shared" else None)
    with torch.inference_mode():
        model(*x)
    _settle()
    dist.barrier()  # every rank maps the store while each measures its share of it
    growth = measure.proc_bytes("Pss:", table="smaps_rollup") - before
    # Placeholders hold no bytes: what the model still holds is its weights outside the blocks.
    outside = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    slots = handle.stats()["device_bytes"]
    dist.barrier()
    result = {"rank": rank, "pss_growth_bytes": growth, "device_bytes": slots, "non_block_bytes": outside,
              "host_bytes": growth - slots - outside}
    with open(f"{out}/rank{rank}.json.tmp", "w") as f:
        json.dump(result, f)
    os.replace(f"{out}/rank{rank}.json.tmp", f"{out}/rank{rank}.json")
    dist.destroy_process_group()


if __name__ == "__main__":
    shape = WanShape(**json.loads(sys.argv[3]))
    rank_main(sys.argv[1], sys.argv[2], replace(shape, patch=tuple(shape.patch)))
