"""state_dict and load_state_dict under offload: the real weights out, new weights in for the next
forward, missing and mismatched keys reported as without offload."""

import io

import pytest
import torch

import fastvideo_offload as fo
from support.models import TinyDiT, tiny_input
from support.offloaded import run_passes


def test_state_dict_under_offload_holds_real_weights():
    model = TinyDiT()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fo.enable(model, device="cpu")
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # a checkpoint saved under offload loads into a fresh model bit-exact
    blob = io.BytesIO()
    torch.save(model.state_dict(), blob)
    blob.seek(0)
    fresh = TinyDiT()
    fresh.load_state_dict(torch.load(blob))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k]), k



def test_load_state_dict_under_offload_reaches_next_forward():
    model = TinyDiT()
    other = TinyDiT()
    x = tiny_input()
    fo.enable(model, device="cpu", prefetch=2)
    run_passes(model, [x])  # fill the device slots with the old weights
    result = model.load_state_dict(other.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(run_passes(model, [x])[0], run_passes(other, [x])[0])
    for k, v in other.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k



def test_load_state_dict_reports_missing_and_mismatched_keys():
    model = TinyDiT()
    fo.enable(model, device="cpu")
    partial = {k: v for k, v in TinyDiT().state_dict().items() if k != "blocks.1.qkv.weight"}
    result = model.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["blocks.1.qkv.weight"]
    wrong = dict(partial, **{"blocks.0.proj.weight": torch.zeros(3, 3)})
    with pytest.raises(RuntimeError, match=r"size mismatch for blocks\.0\.proj\.weight"):
        model.load_state_dict(wrong)
