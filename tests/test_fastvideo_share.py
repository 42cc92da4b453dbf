"""FastVideo's sequence-parallel ranks under `patch_fastvideo()`: its Wan DiT with sequence
parallelism 2, two real processes on gloo (its all-to-all is all_to_all_single, which gloo runs
on a CPU). The DiT's host store is shared per node by itself, read from the checkpoint by the
node's leader alone; ranks holding other weights keep their own."""

import pytest
import torch

from support.needs import integration
from support.fastvideo_cpu import save_wan
from test_share import Ranks, no_leftovers  # noqa: F401 (a fixture)

if torch.cuda.is_available():
    pytest.skip("FastVideo's CPU tests run on a machine without a GPU", allow_module_level=True)

integration("fastvideo")
integration("diffusers")
WORKER = "support.fastvideo_sp_worker"

# FastVideo's ranks on the patch; the shared store's paths run on both devices in test_share.py.
pytestmark = pytest.mark.sync_pass_only


@pytest.mark.usefixtures("no_leftovers")
def test_loader_ranks_share_one_store_bit_identical(tmp_path):
    """FastVideo's TransformerLoader on each rank: the node's leader reads the blocks from the
    checkpoint into the store the ranks share; the other rank reads none of them."""
    save_wan(tmp_path / "wan")
    with Ranks(tmp_path, 2, "load", worker=WORKER) as ranks:
        results = ranks.wait(timeout=240)
        assert all("equal" in r for r in results), ranks.logs()
    for r in results:
        assert r["sequence_parallel"] == 2 and r["shared"] and r["maps_store"] and r["equal"], r
        assert r["from_checkpoint"] and not any("into host memory first" in m for m in r["messages"]), r
    leader, other = results
    print(f"\nbytes read while loading the offloaded DiT: leader {leader['read_bytes']}, other rank "
          f"{other['read_bytes']}; host store {leader['host_bytes']}")
    # The same reads but for the blocks, which the leader alone reads (in the checkpoint's dtype: the
    # store holds them cast to bf16, so the leader reads more than the store holds).
    assert leader["read_bytes"] - other["read_bytes"] >= 0.99 * leader["host_bytes"]


@pytest.mark.usefixtures("no_leftovers")
def test_ranks_with_different_weights_keep_their_own_stores(tmp_path):
    with Ranks(tmp_path, 2, "differ", worker=WORKER) as ranks:
        results = ranks.wait(timeout=240)
        assert all("equal" in r for r in results), ranks.logs()
    for r in results:
        assert not r["shared"] and not r["maps_store"] and r["equal"], r
        assert any("each rank keeps its own host store" in m and "weights differ" in m for m in r["messages"]), r


@pytest.mark.usefixtures("no_leftovers")
def test_lora_merge_and_unmerge_change_the_shared_store_once(tmp_path):
    """FastVideo's own LoRA pipeline at sequence parallelism 2 (set_lora_adapter, which converts and
    merges; unmerge_lora_weights; merge_lora_weights), each block's merge inside `handle.mutate(block)`
    on both ranks of the share, rank 1 a second late to each step: weights and outputs stay
    bit-identical to the resident DiT merged alike in the same process (not merged once per rank)."""
    with Ranks(tmp_path, 2, "lora", worker=WORKER) as ranks:
        results = ranks.wait(timeout=240)
        assert all("checks" in r for r in results), ranks.logs()
    assert all(r["shared"] and r["layers"] == 30 and all(r["checks"].values()) for r in results), results
