"""One rank of tests/test_fastvideo_share.py: FastVideo's distributed environment with sequence
parallelism 2 on gloo, FastVideo's Wan DiT offloaded under `patch_fastvideo()`; writes what it
saw to OUT/rank<R>.json.

    cd tests && python -m support.fastvideo_sp_worker OUT MODE
    (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the env)

MODE: load (FastVideo's TransformerLoader on the checkpoint in OUT/wan) | differ (rank 1 holds
other weights, offloaded the way the loader offloads) | lora (FastVideo's LoRA pipeline merges,
unmerges and merges again an adapter into the offloaded DiT and into the same DiT resident in this
process; rank 1 reaches each step later)."""

import logging
import os
import sys
import time
from collections import defaultdict
from types import SimpleNamespace

import torch

import fastvideo_offload as fo
from fastvideo_offload.checkpoint import CheckpointWeights
from fastvideo_offload.share import NodeShare

from .fastvideo_cpu import load, on_cpu, run, tiny_wan
from .share_worker import _write, holds_memfd, read_bytes


class Messages(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.seen = []

    def emit(self, record):
        self.seen.append(record.getMessage())


def lora_pipeline(transformer):
    """FastVideo's LoRAPipeline around `transformer` alone, with what its constructor would set for
    inference with FastVideo's layerwise offload on (its stages and loaders are not needed here)."""
    from fastvideo.pipelines.lora_pipeline import LoRAPipeline

    class Pipeline(LoRAPipeline):
        def create_pipeline_stages(self, fastvideo_args):
            pass

    pipe = Pipeline.__new__(Pipeline)
    pipe.modules = {"transformer": transformer}
    pipe.trainable_transformer_modules = {"transformer": transformer}
    pipe.fastvideo_args = SimpleNamespace(training_mode=False, dit_layerwise_offload=True)
    pipe.training_mode = False
    pipe.device = torch.device("cpu")
    pipe.lora_adapters, pipe.lora_adapter_paths, pipe.lora_layers = defaultdict(dict), {}, {}
    pipe.exclude_lora_layers = {"transformer": transformer.config.arch_config.exclude_lora_layers}
    pipe.cur_adapter_name, pipe.cur_adapter_path, pipe.cur_adapter_strength = "", "", 1.0
    pipe.lora_target_modules = pipe.lora_rank = pipe.lora_alpha = None
    pipe.lora_initialized = pipe._setting_constructor_adapter = False
    pipe._constructor_dense_lora_path = None
    return pipe


def lora_main(out: str, rank: int) -> dict:
    from fastvideo.layers.lora import linear
    from fastvideo.models.loader import component_loader
    from safetensors.torch import save_file

    linear.get_local_torch_device = lambda: torch.device("cpu")  # FastVideo's CPU platform says "mps"
    model, reference = tiny_wan(seed=0), tiny_wan(seed=0)
    component_loader.enable_layerwise_offload(model)  # shared between the two ranks by the patch
    pipes = [lora_pipeline(m) for m in (model, reference)]

    def same(step: int) -> bool:
        # FastVideo's LoRA layer keeps its base weight under a second name too (cpu_weight: on a CPU the
        # same parameter, registered after enable, so it reads as the engine's placeholder here).
        mine, theirs = model.state_dict(), reference.state_dict()
        keys = [k for k in theirs if not k.endswith(".cpu_weight")]
        return (torch.equal(run(model, step), run(reference, step)) and mine.keys() == theirs.keys()
                and all(torch.equal(mine[k], theirs[k]) for k in keys))

    checks = {"before": same(0)}
    for pipe in pipes:
        pipe.convert_to_lora_layers()
    g = torch.Generator().manual_seed(3)  # the same adapter on every rank, in a file of its own
    adapter = {}
    for name, layer in pipes[1].lora_layers["transformer"].all_lora_layers():
        out_features, in_features = layer.base_layer.weight.shape
        adapter[f"{name}.lora_A.weight"] = torch.randn(4, in_features, generator=g) * 0.1
        adapter[f"{name}.lora_B.weight"] = torch.randn(out_features, 4, generator=g) * 0.1
    save_file(adapter, f"{out}/lora{rank}.safetensors")
    steps = [
        ("merged", lambda pipe: pipe.set_lora_adapter("test", lora_path=f"{out}/lora{rank}.safetensors", strength=0.7)),
        ("unmerged", lambda pipe: pipe.unmerge_lora_weights()),
        ("merged_again", lambda pipe: pipe.merge_lora_weights()),
    ]
    for step, (name, do) in enumerate(steps):
        if rank == 1:
            time.sleep(1.0)  # each block's merge waits for it: the leader cannot merge first, alone
        for pipe in pipes:
            do(pipe)
        checks[name] = same(step)
    return {"rank": rank, "layers": len(adapter) // 2, "shared": isinstance(fo.handle_of(model)._source, NodeShare),
            "checks": checks}


def main(out: str, mode: str) -> None:
    rank = int(os.environ["RANK"])
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    on_cpu(sp=2)
    if mode == "lora":
        fo.patch_fastvideo()
        _write(out, rank, lora_main(out, rank))
        return
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
        "equal": all(torch.equal(run(model, step, dtype=dtype), run(reference, step, dtype=dtype))
                     for step in range(2)),
        "messages": messages.seen,
    }
    _write(out, rank, result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
