"""The compatibility sweep: every transformer class of the installed diffusers, each built from a tiny
configuration with random weights, runs bit-identically offloaded (prefetch 0, 1, 2) as resident;
state_dict and disable are exact; and the share of parameter bytes offloaded at full size is recorded."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import fastvideo_offload as fo
from conftest import integration
from fastvideo_offload.blocks import find_block_lists
from offloaded import packed_bytes
from sweep_configs import DIFFUSERS, FULL_SIZE_SHARE

diffusers = integration("diffusers")
transformers = integration("diffusers.models.transformers")


def _class(name):
    return getattr(diffusers, name, None) or getattr(transformers, name)


def _transformer_classes():
    """Every ModelMixin exported from diffusers with "Transformer" in its name, and every ModelMixin
    of diffusers.models.transformers (the DiT-like backbones without it: HunyuanDiT, LuminaNextDiT...)."""
    mixin = diffusers.ModelMixin
    exported = {n for n in dir(diffusers) if "Transformer" in n}
    modules = set(dir(transformers))
    return {n for n in exported | modules
            if inspect.isclass(c := _class(n)) and issubclass(c, mixin)}


def _params(cases):
    return [pytest.param(name, marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [],
                         id=name) for name, c in sorted(cases.items()) if c.init is not None]


def test_the_sweep_covers_every_transformer_class():
    assert _transformer_classes() == set(DIFFUSERS)


def _randomize(model):
    # Zero-initialised layers (output projections, adaLN gates) would make the output independent of
    # the blocks' weights; nonzero values make every offloaded weight count.
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not p.any():
                p.normal_(std=0.1)
    return model.eval()


def _outputs(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # diffusers' BaseOutput is an OrderedDict
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    return []


def _run(model, inputs):
    kwargs = dict(inputs)
    if "return_dict" in inspect.signature(model.forward).parameters:
        kwargs["return_dict"] = False
    with torch.no_grad():
        return _outputs(model(**copy.deepcopy(kwargs)))


def _same(got, expected):
    return len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected))


def _blocks(model):
    return [block for _, blocks in find_block_lists(model) for _, block in blocks]


@pytest.mark.parametrize("name", _params(DIFFUSERS))
def test_offloaded_forward_is_bit_identical(name):
    case = DIFFUSERS[name]
    torch.manual_seed(0)
    model = _randomize(_class(name)(**case.init))
    reference = copy.deepcopy(model)
    inputs = case.inputs()
    expected = _run(reference, inputs)
    assert expected and all(torch.isfinite(e).all() for e in expected)
    original = reference.state_dict()
    host_bytes = sum(packed_bytes(list(b.parameters())) for b in _blocks(model))
    for prefetch in (0, 1, 2):
        handle = fo.enable(model, device="cpu", prefetch=prefetch)
        assert handle.stats()["host_bytes"] == host_bytes
        state = model.state_dict()
        assert state.keys() == original.keys() and all(torch.equal(state[k], v) for k, v in original.items())
        for _ in range(2):  # the second forward starts from the blocks the first one prefetched
            assert _same(_run(model, inputs), expected)
        handle.disable()
        for (key, p), q in zip(model.named_parameters(), reference.parameters()):
            assert p.dtype == q.dtype and p.stride() == q.stride() and torch.equal(p, q), key
    # the output depends on the offloaded weights: change those of the last block, and it changes
    with torch.no_grad():
        for p in _blocks(reference)[-1].parameters():
            p.add_(0.5)
    assert not _same(_run(reference, inputs), expected)


def _offloaded_share(model) -> float:
    inside = {id(p) for b in _blocks(model) for p in b.parameters()}
    sizes = {id(p): p.numel() * p.element_size() for p in model.parameters()}
    return sum(s for i, s in sizes.items() if i in inside) / sum(sizes.values())


@pytest.mark.parametrize("name", sorted(DIFFUSERS))
def test_offloaded_share_at_full_size(name):
    with torch.device("meta"):
        model = _class(name)(**DIFFUSERS[name].full)
    assert round(_offloaded_share(model), 3) == FULL_SIZE_SHARE[name]
