"""Enabling offload and checking exactly what it took: shared by the discovery tests."""

from __future__ import annotations

import copy

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
