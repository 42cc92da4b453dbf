"""Block submodules that also run outside their block's forward (DiT's head calls
`transformer_blocks[0].norm1.emb`): found in the first forward, kept resident, exact."""

import copy
import functools

import pytest
import torch
from torch import nn

import fastvideo_offload as fo
from support.needs import integration
from support.models import Block


class HeadReachesIn(nn.Module):
    """Each block owns an `emb`, which its forward does not use; the head calls block 0's after the
    loop, and block 1's forward calls block 0's too (from inside another block)."""

    def __init__(self, dim: int = 32, layers: int = 3):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        for block in self.blocks:
            block.emb = nn.Sequential(nn.Linear(4, dim), nn.SiLU(), nn.Linear(dim, dim))
        # A partial, not a lambda, so that deepcopy points the copy's probe at the copy.
        self.blocks[1].probe = functools.partial(HeadReachesIn.reach_in, self)
        self.head = nn.Linear(dim, 8)
        self.seen = []

    def reach_in(self, block):
        self.seen.append(self.blocks[0].emb(self.t).sum())

    def forward(self, x, t):
        self.t, self.seen = t, []
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x * self.blocks[0].emb(t)[:, None]) + torch.stack(self.seen).sum()


def emb_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.blocks[0].emb.parameters())


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_a_submodule_called_outside_its_block_is_exact_and_kept_resident(prefetch):
    model = HeadReachesIn()
    reference = copy.deepcopy(model)
    x, t = torch.randn(2, 5, 8), torch.randn(2, 4)
    handle = fo.enable(model, device="cpu", prefetch=prefetch)
    assert handle.stats()["outside_resident_bytes"] == 0
    with torch.no_grad():
        expected = reference(x, t)
        for _ in range(3):
            assert torch.equal(model(x, t), expected)
            # Outside any call, block 0's emb holds placeholders again: its resident copy is swapped
            # in only for the calls outside its block.
            assert all(p.numel() == 0 for p in model.blocks[0].emb.parameters())
    assert handle.stats()["outside_resident_bytes"] == emb_bytes(reference)
    # Only the submodule found running outside its block swaps weights after its calls.
    swapping = [m for b in model.blocks for m in b.modules() if m is not b and m._forward_hooks]
    assert swapping == [model.blocks[0].emb]
    handle.disable()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_weight_changes_reach_the_resident_copy():
    model = HeadReachesIn()
    reference = copy.deepcopy(model)
    x, t = torch.randn(2, 5, 8), torch.randn(2, 4)
    handle = fo.enable(model, device="cpu")
    with torch.no_grad():
        model(x, t)
        with handle.mutate(model.blocks[0]):
            model.blocks[0].emb[0].weight.mul_(2)
        reference.blocks[0].emb[0].weight.mul_(2)
        assert torch.equal(model(x, t), reference(x, t))
        state = reference.state_dict()
        state["blocks.0.emb.2.bias"] = torch.randn_like(state["blocks.0.emb.2.bias"])
        reference.load_state_dict(state)
        model.load_state_dict(state)
        assert torch.equal(model(x, t), reference(x, t))


def test_diffusers_dit_head_calls_block_zero():
    diffusers = integration("diffusers")
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1,
    ).eval()  # in training mode its label embedding drops labels at random
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised layers would hide a wrong weight
            p.normal_(0, 0.5)
    reference = copy.deepcopy(model)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([3]),
                  class_labels=torch.tensor([1]))
    handle = fo.enable(model, device="cpu")
    with torch.no_grad():
        expected = reference(**inputs).sample
        for _ in range(2):
            assert torch.equal(model(**inputs).sample, expected)
    emb = reference.transformer_blocks[0].norm1.emb
    assert handle.stats()["outside_resident_bytes"] == sum(p.numel() * p.element_size() for p in emb.parameters())
