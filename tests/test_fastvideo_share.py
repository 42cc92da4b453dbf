"""FastVideo's sequence-parallel ranks under `patch_fastvideo()`: its Wan DiT with sequence
parallelism 2, two real processes on gloo (its all-to-all is all_to_all_single, which gloo runs
on a CPU). The DiT's host store is shared per node by itself; ranks holding other weights keep
their own."""

import pytest
import torch

from conftest import integration
from fastvideo_cpu import save_wan
from test_share import Ranks, no_leftovers  # noqa: F401 (a fixture)

if torch.cuda.is_available():
    pytest.skip("FastVideo's CPU tests run on a machine without a GPU", allow_module_level=True)

integration("fastvideo")
integration("diffusers")
WORKER = __file__.replace("test_fastvideo_share.py", "fastvideo_sp_worker.py")


def test_loader_ranks_share_one_store_bit_identical(tmp_path, no_leftovers):
    """FastVideo's TransformerLoader on each rank: with several ranks it loads into host memory
    first (the share compares loaded weights; logged), then one store per node is shared."""
    save_wan(tmp_path / "wan")
    with Ranks(tmp_path, 2, "load", worker=WORKER) as ranks:
        results = ranks.wait(timeout=240)
        assert all("equal" in r for r in results), ranks.logs()
    for r in results:
        assert r["sequence_parallel"] == 2 and r["shared"] and r["maps_store"] and r["equal"], r
        assert any("several ranks share a node's host store" in m for m in r["messages"]), r


def test_ranks_with_different_weights_keep_their_own_stores(tmp_path, no_leftovers):
    with Ranks(tmp_path, 2, "differ", worker=WORKER) as ranks:
        results = ranks.wait(timeout=240)
        assert all("equal" in r for r in results), ranks.logs()
    for r in results:
        assert not r["shared"] and not r["maps_store"] and r["equal"], r
        assert any("each rank keeps its own host store" in m and "weights differ" in m for m in r["messages"]), r
