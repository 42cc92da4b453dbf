"""One rank of tests/test_fastvideo_share.py: FastVideo's distributed environment with sequence
parallelism 2 on gloo, FastVideo's Wan DiT offloaded under `patch_fastvideo()`; writes what it
saw to OUT/rank<R>.json.

    python tests/fastvideo_sp_worker.py OUT MODE   (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the env)

MODE: load (FastVideo's TransformerLoader on the checkpoint in OUT/wan) | differ (rank 1 holds
other weights, offloaded the way the loader offloads)."""

import json
import logging
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from fastvideo_cpu import load, on_cpu, run, tiny_wan  # noqa: E402
from share_worker import _write, holds_memfd, read_bytes  # noqa: E402

import fastvideo_offload as fo  # noqa: E402
from fastvideo_offload.checkpoint import CheckpointWeights  # noqa: E402
from fastvideo_offload.share import NodeShare  # noqa: E402


class Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.seen = []

    def emit(self, record):
        self.seen.append(record.getMessage())


def main(out: str, mode: str) -> None:
    rank = int(os.environ["RANK"])
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    on_cpu(sp=2)
    messages = Messages()
    logging.getLogger("fastvideo_offload").addHandler(messages)
    logging.getLogger("fastvideo_offload").setLevel(logging.INFO)
    fo.patch_fastvideo()
    dtype = torch.bfloat16 if mode == "load" else torch.float32  # FastVideo's Wan loads in bf16
    read = 0
    if mode == "load":
        reference = load(f"{out}/wan", offload=False)
        read = read_bytes()
        model = load(f"{out}/wan", offload=True)
        read = read_bytes() - read
    else:
        from fastvideo.models.loader import component_loader

        model = tiny_wan(seed=rank)
        reference = tiny_wan(seed=rank)
        component_loader.enable_layerwise_offload(model)  # what TransformerLoader.load calls
    handle = fo.handle_of(model)
    from fastvideo.distributed.parallel_state import get_sp_world_size

    result = {
        "rank": rank,
        "sequence_parallel": get_sp_world_size(),
        "shared": isinstance(handle._source, NodeShare),
        "from_checkpoint": isinstance(getattr(handle._source, "source", None), CheckpointWeights),
        "read_bytes": read,
        "host_bytes": handle.stats()["host_bytes"],
        "maps_store": holds_memfd(),
        "equal": all(torch.equal(run(model, step, dtype=dtype), run(reference, step, dtype=dtype)) for step in range(2)),
        "messages": messages.seen,
    }
    _write(out, rank, result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
