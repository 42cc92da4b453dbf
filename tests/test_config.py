"""OffloadConfig: enable's arguments checked once, frozen, and what the handle was built with."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastvideo_offload as fo
from support.models import TinyDiT


def test_the_handle_keeps_the_checked_configuration_with_prefetch_as_cut():
    model = TinyDiT()
    handle = fo.enable(model, device="cpu", prefetch=9, staging_threads=2)
    try:
        config = handle.config
        assert config == fo.OffloadConfig(torch.device("cpu"), prefetch=len(model.blocks) - 1, staging_threads=2)
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.prefetch = 1
    finally:
        handle.disable()


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"prefetch": 1.0}, TypeError, "prefetch must be an int, got float"),
        ({"prefetch": True}, TypeError, "prefetch must be an int, got bool"),
        ({"prefetch": -1}, ValueError, "prefetch must be >= 0, got -1"),
        ({"group": 3}, TypeError, "group must be a string, got int"),
        ({"device_budget": 1.5}, TypeError, "device_budget must be a byte count"),
        ({"host_pin_budget": -1}, ValueError, "host_pin_budget must be a byte count in"),
        ({"staging_threads": 0}, ValueError, r"staging_threads must be in \[1, 64\], got 0"),
        ({"staging_threads": "2"}, TypeError, "staging_threads must be an int, got str"),
        ({"device": "cpu"}, TypeError, "device must be a torch.device"),
    ],
)
def test_a_bad_field_is_refused_by_name(changes, error, message):
    fields = {"device": torch.device("cpu"), **changes}
    with pytest.raises(error, match=message):
        fo.OffloadConfig(**fields)


def test_enable_refuses_through_the_same_checks_and_leaves_the_model_as_it_was():
    model = TinyDiT()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="prefetch must be >= 0"):
        fo.enable(model, device="cpu", prefetch=-1)
    assert fo.handle_of(model) is None
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
