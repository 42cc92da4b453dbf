"""The compatibility sweep over every DiT of the installed FastVideo: each one's share of parameter bytes
offloaded at full size (its config's defaults, built on the meta device) is pinned, and each one with a
tiny configuration (tests/support/sweep_fastvideo.py) runs bit-identically offloaded (prefetch 0, 1, 2) as
resident, with state_dict and disable exact."""

from __future__ import annotations

import copy
import importlib
import pkgutil

import pytest
import torch

from support.sweep_check import check_offload, offloaded_share, one_thread, outputs  # noqa: F401 (one_thread: a fixture)
from support.sweep_configs import FASTVIDEO, FASTVIDEO_FULL_SIZE_SHARE, FASTVIDEO_TINY
from test_fastvideo import _init, fastvideo_cpu  # noqa: F401 (fastvideo_cpu: a fixture)


def test_the_sweep_covers_every_dit():
    import fastvideo.models.dits
    from fastvideo.models.dits.base import BaseDiT

    found = set()
    for info in pkgutil.walk_packages(fastvideo.models.dits.__path__, "fastvideo.models.dits."):
        module = importlib.import_module(info.name)
        found |= {c.__name__ for c in vars(module).values()
                  if isinstance(c, type) and issubclass(c, BaseDiT) and c is not BaseDiT}
    assert found == set(FASTVIDEO)


def _build(name, arch=None):
    """FastVideo's DiT `name`, with its config's defaults (full size) or with `arch` as its arch_config."""
    module, config = FASTVIDEO[name]
    dit = getattr(importlib.import_module(f"fastvideo.models.dits.{module}"), name)
    config_module, config_class = config.rsplit(".", 1)
    config = getattr(importlib.import_module(f"fastvideo.configs.models.dits.{config_module}"), config_class)
    config = config() if arch is None else config(arch_config=type(config().arch_config)(**arch))
    return dit(config=config, hf_config={})


@pytest.mark.parametrize("name", sorted(FASTVIDEO))
def test_offloaded_share_at_full_size(name):
    with torch.device("meta"):
        model = _build(name)
    assert round(offloaded_share(model), 3) == FASTVIDEO_FULL_SIZE_SHARE[name]


@pytest.mark.parametrize("name", sorted(FASTVIDEO_TINY))
def test_tiny_offloaded_forward_is_bit_identical(name):
    from fastvideo.forward_context import set_forward_context

    case = FASTVIDEO_TINY[name]
    torch.manual_seed(0)
    model = _init(_build(name, case.init), 0)  # FastVideo's linears start from torch.empty
    inputs = case.inputs()

    def forward(m):
        with torch.no_grad(), set_forward_context(current_timestep=0, attn_metadata=None, forward_batch=None):
            return outputs(m(**copy.deepcopy(inputs)))

    check_offload(model, forward)
