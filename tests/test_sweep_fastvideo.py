"""The compatibility sweep over FastVideo's DiTs: each one's share of parameter bytes offloaded at full
size (its config's defaults, built on the meta device), and the tiny ones tests/test_fastvideo.py builds
run bit-identically offloaded at prefetch 0, 1, 2."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

from sweep_check import check_offload, offloaded_share
from sweep_configs import FASTVIDEO, FASTVIDEO_FULL_SIZE_SHARE
from test_fastvideo import fastvideo_cpu, run, tiny_hunyuan, tiny_wan  # noqa: F401 (fastvideo_cpu: a fixture)


def test_the_sweep_covers_every_dit():
    import fastvideo.models.dits
    from fastvideo.models.dits.base import BaseDiT

    found = set()
    for info in pkgutil.walk_packages(fastvideo.models.dits.__path__, "fastvideo.models.dits."):
        module = importlib.import_module(info.name)
        found |= {c.__name__ for c in vars(module).values()
                  if isinstance(c, type) and issubclass(c, BaseDiT) and c is not BaseDiT}
    assert found == set(FASTVIDEO)


@pytest.mark.parametrize("make, hunyuan", [(tiny_wan, False), (tiny_hunyuan, True)], ids=["Wan", "HunyuanVideo"])
def test_offloaded_forward_is_bit_identical(make, hunyuan):
    check_offload(make(), lambda m: [run(m, hunyuan=hunyuan)])


@pytest.mark.parametrize("name", sorted(FASTVIDEO))
def test_offloaded_share_at_full_size(name):
    module, config = FASTVIDEO[name]
    dit = getattr(importlib.import_module(f"fastvideo.models.dits.{module}"), name)
    config_module, config_class = config.rsplit(".", 1)
    arch = getattr(importlib.import_module(f"fastvideo.configs.models.dits.{config_module}"), config_class)
    with torch.device("meta"):
        model = dit(config=arch(), hf_config={})
    assert round(offloaded_share(model), 3) == FASTVIDEO_FULL_SIZE_SHARE[name]
