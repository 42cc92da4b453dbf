"""What the compatibility sweep checks on each model: offloaded forwards bit-identical to resident at
prefetch 0, 1 and 2, state_dict and disable exact, outputs that depend on the offloaded weights; and
the share of parameter bytes offloaded."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

import fastvideo_offload as fo
from fastvideo_offload.blocks import find_block_lists
from .offloaded import packed_bytes


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The sweep's models are tiny: intra-op threads only add their synchronisation, which on a loaded
    machine costs more than the work (20x and more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize(model):
    # Zero-initialised layers (output projections, adaLN gates) would make the output independent of
    # the blocks' weights; nonzero values make every offloaded weight count.
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not p.any():
                p.normal_(std=0.1)
    return model.eval()


def _blocks(model):
    return [block for _, blocks in find_block_lists(model) for _, block in blocks]


def _same(got, expected):
    return len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def outputs(out) -> list[torch.Tensor]:
    """The tensors of a forward's output, whatever its structure."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # diffusers' BaseOutput is an OrderedDict
        out = list(out.values())
    elif dataclasses.is_dataclass(out):  # FastVideo's Flux and SD3 outputs are plain dataclasses
        out = [getattr(out, f.name) for f in dataclasses.fields(out)]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in outputs(o)]
    return []


# The sweep proves that each model offloads exactly; the ordering of asynchronous copies is proven
# by the rest of the suite on the asynchronous device, where one prefetch depth per model suffices
# and keeps `make test` short.
PREFETCHES = (1,) if os.environ.get("FASTVIDEO_OFFLOAD_CPU_TRANSFER") == "async" else (0, 1, 2)


def check_offload(model, run):
    """`run(model)` returns the output tensors of one forward under torch.no_grad()."""
    # in eval mode, as loaders hand a model over: FastVideo's frozen linears sit beside trainable
    # biases and norms, which in training mode would stay resident as LoRA's do
    model.eval()
    reference = copy.deepcopy(model)
    expected = run(reference)
    assert expected and all(torch.isfinite(e).all() for e in expected)
    original = reference.state_dict()
    host_bytes = sum(packed_bytes(list(b.parameters())) for b in _blocks(model))
    for prefetch in PREFETCHES:
        handle = fo.enable(model, device="cpu", prefetch=prefetch)
        assert handle.stats()["host_bytes"] == host_bytes
        state = model.state_dict()
        assert state.keys() == original.keys() and all(torch.equal(state[k], v) for k, v in original.items())
        for _ in range(2):  # the second forward starts from the blocks the first one prefetched
            assert _same(run(model), expected)
        handle.disable()
        for (key, p), q in zip(model.named_parameters(), reference.parameters()):
            assert p.dtype == q.dtype and p.stride() == q.stride() and torch.equal(p, q), key
    # the output depends on the offloaded weights: change those of the last block, and it changes
    with torch.no_grad():
        for p in _blocks(reference)[-1].parameters():
            p.add_(0.5)
    assert not _same(run(reference), expected)


def offloaded_share(model) -> float:
    inside = {id(p) for b in _blocks(model) for p in b.parameters()}
    sizes = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    return sum(s for i, s in sizes.items() if i in inside) / sum(sizes.values())
