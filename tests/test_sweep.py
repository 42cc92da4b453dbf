"""The compatibility sweep over every transformer class of the installed diffusers: each one with a tiny
configuration (tests/support/sweep_diffusers.py), built with random weights, runs bit-identically offloaded
(prefetch 0, 1, 2) as resident, with state_dict and disable exact; every one's share of parameter bytes
offloaded at full size is pinned."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from support.needs import integration
from support.sweep_check import check_offload, offloaded_share, one_thread, outputs, randomize  # noqa: F401 (one_thread: a fixture)
from support.sweep_configs import DIFFUSERS, FULL_SIZE_SHARE

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


def _run(model, inputs):
    kwargs = dict(inputs)
    if "return_dict" in inspect.signature(model.forward).parameters:
        kwargs["return_dict"] = False
    with torch.no_grad():
        return outputs(model(**copy.deepcopy(kwargs)))  # a forward that changes its inputs cannot touch the next


@pytest.mark.parametrize("name", _params(DIFFUSERS))
def test_offloaded_forward_is_bit_identical(name):
    case = DIFFUSERS[name]
    torch.manual_seed(0)
    model = randomize(_class(name)(**case.init))
    inputs = case.inputs()
    check_offload(model, lambda m: _run(m, inputs))


@pytest.mark.parametrize("name", sorted(DIFFUSERS))
def test_offloaded_share_at_full_size(name):
    with torch.device("meta"):
        model = _class(name)(**DIFFUSERS[name].full)
    assert round(offloaded_share(model), 3) == FULL_SIZE_SHARE[name]
