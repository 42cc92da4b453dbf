"""enable(..., group=): the members of a group take turns on the device."""

import pytest

import fastvideo_offload as fo
from support.models import TinyDiT, tiny_input
from support.offloaded import run_passes


def test_group_members_take_turns_on_the_device():
    a, b = TinyDiT(), TinyDiT()
    ha = fo.enable(a, device="cpu", group="pair")
    fo.enable(b, device="cpu", group="pair")
    solo = TinyDiT()
    hs = fo.enable(solo, device="cpu")
    run_passes(a, [tiny_input()])
    run_passes(solo, [tiny_input()])
    assert ha.stats()["device_bytes"] > 0
    run_passes(b, [tiny_input()])
    assert ha.stats()["device_bytes"] == 0  # a gave its slots back when b started
    assert hs.stats()["device_bytes"] > 0  # not in the group
    with pytest.raises(TypeError, match="group"):
        fo.enable(TinyDiT(), device="cpu", group=3)
