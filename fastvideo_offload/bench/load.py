"""Load: a checkpoint on disk to a model ready to run, the same checkpoint each way, each way in a
process of its own: its time, and its peak RSS growth (VmHWM less the RSS before loading) against
the host store (less the weights outside the blocks where the device is the CPU).

The bench model is written once as diffusers' `save_pretrained` lays a sharded checkpoint out
(safetensors shards, an index json, a config.json naming the class); it is not a diffusers model,
so the files are written with safetensors directly. The ways:
- ours: the model built on the meta device, then `enable(model, checkpoint=dir)`;
- diffusers: the whole model in host memory, as `from_pretrained` leaves it (a real model, each
  shard's state dict loaded into it), then group offloading as the main scenario sets it up;
- fastvideo: its TransformerLoader, if it can build this model.

    python -m fastvideo_offload.bench.load WAY CHECKPOINT_DIR DEVICE   (one way; writes DIR/WAY.json)
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch
from safetensors.torch import save_file

from .. import api
from . import measure, modes
from .model import WanShape, build_empty, inputs, time_frequencies

WAYS = ("ours", "diffusers", "fastvideo")
INDEX = "diffusion_pytorch_model.safetensors.index.json"
#: Checkpoints of real DiTs come in several shards; this many make the index matter.
SHARDS = 4
#: The forward that shows each loaded model runs, and runs the written weights.
TOKENS = 16
TIMEOUT_S = 300


def write_checkpoint(model: torch.nn.Module, shape: WanShape, dtype: torch.dtype, directory: str) -> int:
    """`model`'s state dict as `save_pretrained` writes it: shards of at most a SHARDS-th of the
    model, in state-dict order, and the index mapping each key to its shard. Returns the bytes."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    total = sum(t.nbytes for t in state.values())
    limit = math.ceil(total / SHARDS)
    shards: list[dict] = [{}]
    for key, tensor in state.items():
        if shards[-1] and sum(t.nbytes for t in shards[-1].values()) + tensor.nbytes > limit:
            shards.append({})
        shards[-1][key] = tensor
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"_class_name": type(model).__name__, "dtype": str(dtype).removeprefix("torch."),
                   "shape": shape.as_dict()}, f, indent=1)
    return total


def compare(make_model, shape: WanShape, dtype: torch.dtype, device: torch.device, out_of_time) -> dict:
    """Writes the checkpoint, then loads it each way in a fresh process; each row is checked
    against the written model's output."""
    with tempfile.TemporaryDirectory(prefix="fastvideo_offload-load-") as directory:
        model = make_model()
        store = sum(modes.block_sizes(model))
        section = {
            "checkpoint_bytes": write_checkpoint(model, shape, dtype, directory),
            "files": len([n for n in os.listdir(directory) if n.endswith(".safetensors")]),
            "store_bytes": store,
            "non_block_bytes": sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
            - sum(p.nbytes for p in model.blocks.parameters()),
            # On a CPU device the weights outside the blocks are host memory too, and count in RSS.
            "non_block_on_host": device.type == "cpu",
            "ways": {},
        }
        with torch.inference_mode():
            reference = model.to(device)(*inputs(shape, TOKENS, dtype, device)).float().cpu()
        del model
        measure.free_memory(device)
        for way in WAYS:
            if out_of_time():
                section["ways"][way] = {"skipped": "time limit"}
                continue
            row = _run_way(way, directory, device)
            if os.path.exists(f"{directory}/{way}.pt"):
                # Not bit-identity: on a CPU, weights at other alignments take other kernel paths.
                row["max_abs_diff"] = (torch.load(f"{directory}/{way}.pt") - reference).abs().max().item()
            if "peak_rss_bytes" in row:
                on_host = section["non_block_bytes"] if section["non_block_on_host"] else 0
                row["x_store"] = (row["peak_rss_bytes"] - on_host) / store
            section["ways"][way] = row
    ways = section["ways"]
    if "seconds" in ways.get("ours", {}) and "seconds" in ways.get("diffusers", {}):
        section["diffusers_vs_ours"] = ways["diffusers"]["seconds"] / ways["ours"]["seconds"]
    return section


def _run_way(way: str, directory: str, device: torch.device) -> dict:
    # The child imports the package the bench runs from (a worktree's, not an installed one).
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run([sys.executable, "-m", "fastvideo_offload.bench.load", way, directory, str(device)],
                              env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        return {"skipped": f"failed: still loading after {TIMEOUT_S} s"}
    if proc.returncode != 0 or not os.path.exists(f"{directory}/{way}.json"):
        return {"skipped": f"failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"}
    with open(f"{directory}/{way}.json") as f:
        return json.load(f)


def _fastvideo_cannot_load(class_name: str) -> str:
    if importlib.util.find_spec("fastvideo") is None:
        return "fastvideo is not installed"
    from fastvideo.models.registry import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    if class_name not in supported:
        return (f"FastVideo's TransformerLoader builds the class that config.json's _class_name names from its "
                f"ModelRegistry ({len(supported)} DiTs and encoders); the bench's {class_name} is not one of them")
    return f"{class_name} is in FastVideo's ModelRegistry, but the bench has no FastVideo pipeline config for it"


def _ours(model, directory, device) -> dict:
    handle = api.enable(model, device=device, checkpoint=directory)
    return {"host_bytes": handle.stats()["host_bytes"]}


def _diffusers(model, directory, device) -> dict:
    from safetensors.torch import load_file

    with open(os.path.join(directory, INDEX)) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    # Allocated, not initialized: from_pretrained's weights end up in host memory either way; its
    # mmap-backed tensors would only defer the reads to the first touch, out of the timed load.
    model.to_empty(device="cpu")
    model.register_buffer("freqs", time_frequencies(model.shape.freq_dim), persistent=False)
    for name in shards:
        model.load_state_dict(load_file(os.path.join(directory, name)), strict=False)
    modes._diffusers(model, device)
    return {}


def child(way: str, directory: str, device: torch.device) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    if way == "fastvideo":
        return {"unavailable": _fastvideo_cannot_load(config["_class_name"])}
    shape = WanShape(**config["shape"])
    shape = replace(shape, patch=tuple(shape.patch))
    dtype = getattr(torch, config["dtype"])
    if way == "diffusers":
        import diffusers.hooks  # noqa: F401  (imported before the baseline: the loading is measured, not imports)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context's host memory is not the loader's
    model = build_empty(shape, dtype)
    gc.collect()
    before = measure.proc_bytes("VmRSS:")
    measure.reset_peak_rss()
    start = time.perf_counter()
    row = {"ours": _ours, "diffusers": _diffusers}[way](model, directory, device)
    measure.sync(device)
    row["seconds"] = time.perf_counter() - start
    row["peak_rss_bytes"] = measure.proc_bytes("VmHWM:") - before
    with torch.inference_mode():
        output = model(*inputs(shape, TOKENS, dtype, device))
    torch.save(output.float().cpu(), os.path.join(directory, f"{way}.pt"))
    return row


if __name__ == "__main__":
    way, directory, device = sys.argv[1:4]
    result = child(way, directory, torch.device(device))
    with open(os.path.join(directory, f"{way}.json.tmp"), "w") as f:
        json.dump(result, f)
    os.replace(os.path.join(directory, f"{way}.json.tmp"), os.path.join(directory, f"{way}.json"))
