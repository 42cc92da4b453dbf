"""Which lists of blocks `enable` finds on its own, which `blocks=` refuses, and what it logs."""

import logging

import pytest
import torch
from torch import nn

import fastvideo_offload as fo
from support.models import Block, ListOf, OtherBlock, PairList, SequentialStack, TinyDiT, TwoListDiT, tiny_input
from support.offloaded import enable_and_check


def run(model):
    torch.manual_seed(1)
    return torch.cat([model(tiny_input()) for _ in range(2)])


def test_list_of_lists_offloads_their_called_members():
    model = PairList(depth=3)
    handle = enable_and_check(model, [f"layers.{i}.{j}" for i in range(3) for j in range(2)], run)
    assert handle.block_paths == ["layers"]
    assert handle.stats()["enters"] == 2 * 2 * 6


def test_naming_a_list_whose_items_are_never_called_is_refused():
    model = PairList()
    with pytest.raises(ValueError, match=r"items of 'layers' \(0, 1, 2\) are ModuleList modules, which are "
                                         r"never called"):
        fo.enable(model, device="cpu", blocks=["layers"])
    assert all(p.numel() > 0 for p in model.parameters())
    # one pair is a list of called modules
    handle = enable_and_check(model, ["layers.1.0", "layers.1.1"], run, blocks=["layers.1"])
    assert handle.block_paths == ["layers.1"]


def test_weightless_member_is_left_out():
    model = ListOf([Block(32), nn.Identity(), Block(32), nn.Sequential(nn.GELU())])
    handle = enable_and_check(model, ["layers.0", "layers.2"], run)
    assert handle.block_paths == ["layers"]


def test_members_of_different_types_are_found():
    model = ListOf([Block(32), OtherBlock(32), Block(32)])
    enable_and_check(model, ["layers.0", "layers.1", "layers.2"], run)


def test_list_of_plain_layers_is_not_blocks():
    model = ListOf([Block(32), nn.Linear(32, 32)])
    with pytest.raises(ValueError, match="has no nn.ModuleList of transformer blocks"):
        fo.enable(model, device="cpu")


def test_sequential_of_blocks_is_found_and_an_mlp_is_not():
    model = SequentialStack()
    names = ["blocks.0", "blocks.1", "text_conv.0", "text_conv.1", "text_conv.2"]
    handle = enable_and_check(model, names, run)
    # the head and each block's own mlp are Sequentials of plain layers: not lists of blocks
    assert handle.block_paths == ["blocks", "text_conv"]


def test_explicit_sequential():
    model = SequentialStack()
    handle = enable_and_check(model, ["text_conv.0", "text_conv.1", "text_conv.2"], run, blocks=["text_conv"])
    assert handle.block_paths == ["text_conv"]


def test_list_inside_a_found_block_stays_part_of_it():
    class WithInnerList(Block):
        def __init__(self, dim):
            super().__init__(dim)
            self.inner = nn.ModuleList(OtherBlock(dim) for _ in range(2))

        def forward(self, x):
            for layer in self.inner:
                x = layer(x)
            return super().forward(x)

    model = ListOf([WithInnerList(32) for _ in range(2)])
    handle = enable_and_check(model, ["layers.0", "layers.1"], run)
    assert handle.block_paths == ["layers"]


def test_enable_logs_each_list_and_the_resident_share(caplog):
    model = TinyDiT(dim=32, layers=4)
    block_bytes = sum(p.numel() * 4 for p in model.blocks.parameters())
    total = sum(p.numel() * 4 for p in model.parameters())
    with caplog.at_level(logging.INFO, logger="fastvideo_offload"):
        fo.enable(model, device="cpu")
    messages = [r.getMessage() for r in caplog.records]
    assert f"offloading blocks: 4 blocks, {block_bytes / 2**20:.1f} MiB" in messages
    share = 100 * (total - block_bytes) / total
    mib = (total - block_bytes) / 2**20
    assert f"{share:.1f}% of TinyDiT's parameter bytes ({mib:.1f} MiB) stay on cpu" in messages
    assert share < 10 and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_warning_names_what_stays_on_the_device(caplog):
    model = TwoListDiT()  # 3 double and 2 single blocks
    with caplog.at_level(logging.INFO, logger="fastvideo_offload"):
        fo.enable(model, device="cpu", blocks=["double_blocks"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "of TwoListDiT's parameter bytes stay on cpu, the largest in single_blocks (" in warnings[0]
    assert "name it with blocks=[...]" in warnings[0]


def test_members_without_a_forward_of_their_own_stand_in_with_their_members():
    class Pair(nn.Module):  # only holds its two modules: the model calls them, never the pair
        def __init__(self, dim):
            super().__init__()
            self.attn, self.ff = Block(dim), OtherBlock(dim)

    class Model(ListOf):
        def forward(self, x):
            x = self.embed(x)
            for pair in self.layers:
                x = pair.ff(pair.attn(x))
            return self.head(x)

    model = Model([Pair(32) for _ in range(2)])
    enable_and_check(model, ["layers.0.attn", "layers.0.ff", "layers.1.attn", "layers.1.ff"], run)
    with pytest.raises(ValueError, match=r"items of 'layers' \(0, 1\) are Pair modules, which are never called"):
        fo.enable(Model([Pair(32) for _ in range(2)]), device="cpu", blocks=["layers"])
