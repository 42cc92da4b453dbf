"""Enabling offload and checking exactly what it took and that the outputs do not change: shared by
the tests of enable."""

from __future__ import annotations

import copy
import gc

import pytest
import torch

import fastvideo_offload as fo


def packed_bytes(params) -> int:
    """The host bytes of one block: its parameters one after another, each at a 256-byte aligned offset."""
    end = 0
    for p in params:
        end = -(-end // 256) * 256 + p.numel() * p.element_size()
    return end


def enable_and_check(model, offloaded: list[str], run, **enable_kwargs):
    """Enables offload on `model` and checks that exactly the modules named `offloaded` were offloaded
    (their parameters hold placeholders, every other parameter its data), that the host store holds
    exactly their bytes, and that `run(model)` gives bit-identical outputs, twice."""
    reference = copy.deepcopy(model)
    sizes = sum(packed_bytes(list(model.get_submodule(name).parameters())) for name in offloaded)
    inside = {id(p) for name in offloaded for p in model.get_submodule(name).parameters()}
    handle = fo.enable(model, device="cpu", **enable_kwargs)
    assert handle.stats()["blocks"] == len(offloaded)
    assert handle.stats()["host_bytes"] == sizes
    for p in model.parameters():
        assert (p.numel() == 0) == (id(p) in inside)
    with torch.no_grad():
        expected = run(reference)
        for _ in range(2):
            assert torch.equal(run(model), expected)
    return handle


def is_placeholder(p: torch.Tensor) -> bool:
    """An offloaded block's parameter outside its block's forward: an empty 1-d tensor."""
    return p.numel() == 0 and p.dim() == 1


def run_passes(model, inputs):
    with torch.no_grad():
        return [model(x) for x in inputs]


def assert_same_outputs(make_model, inputs, **enable_kwargs):
    """Offloads a copy of `make_model()`, checks that its outputs on `inputs` are the model's bit for bit,
    and returns it with its handle."""
    reference = make_model()
    offloaded = copy.deepcopy(reference)
    expected = run_passes(reference, inputs)
    handle = fo.enable(offloaded, device="cpu", **enable_kwargs)
    got = run_passes(offloaded, inputs)
    for e, g in zip(expected, got):
        assert torch.equal(e, g)
    return offloaded, handle


def assert_dropping_frees_the_engine(holder: list) -> None:
    """`holder` has the only reference to an offloaded model: dropping it releases the engine at
    once, without a gc pass (no reference cycle between the model and its handle)."""
    engine = fo.handle_of(holder[0])._engine
    gc.collect()
    gc.disable()
    try:
        holder.clear()
        with pytest.raises(ValueError, match="no offload engine"):
            fo._ops.engine_stats(engine)
    finally:
        gc.enable()
