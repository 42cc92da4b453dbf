"""Small models shaped like video DiTs, for tests: random weights, CPU-sized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Attention and MLP, as in a DiT block; `probe` (if set) is called from inside forward."""

    def __init__(self, dim: int, heads: int = 2, dtype=torch.float32):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, dtype=dtype)
        self.qkv = nn.Linear(dim, 3 * dim, dtype=dtype)
        self.proj = nn.Linear(dim, dim, dtype=dtype)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim, dtype=dtype), nn.GELU(), nn.Linear(2 * dim, dim, dtype=dtype))
        self.probe = None

    def forward(self, x: torch.Tensor, inside: nn.Module | None = None) -> torch.Tensor:
        if self.probe is not None:
            self.probe(self)
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        if inside is not None:  # another block, run between this one's attention and its MLP
            x = inside(x)
        return x + self.mlp(x)


class TinyDiT(nn.Module):
    """Patch embedding, a list of blocks, a head; a RoPE-like buffer outside the blocks."""

    def __init__(self, dim: int = 32, layers: int = 4, dtype=torch.float32):
        super().__init__()
        self.embed = nn.Linear(8, dim, dtype=dtype)
        self.blocks = nn.ModuleList(Block(dim, dtype=dtype) for _ in range(layers))
        self.head = nn.Linear(dim, 8, dtype=dtype)
        self.register_buffer("freqs", torch.linspace(0, 1, dim, dtype=dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.freqs
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class CallsInside(TinyDiT):
    """Block `outer` runs block `inner` inside its forward, so that it reads its own weights on
    both sides of the call (a block reused as a refiner); `inner` also runs in its own place."""

    def __init__(self, outer: int, inner: int, layers: int = 6):
        super().__init__(layers=layers)
        self.outer, self.inner = outer, inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x) + self.freqs
        for i, block in enumerate(self.blocks):
            x = block(x, self.blocks[self.inner] if i == self.outer else None)
        return self.head(x)


class TwoListDiT(nn.Module):
    """HunyuanVideo's shape: double blocks, then single blocks, the lists registered in the
    opposite order to the one they run in (so the engine must learn the order)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.single_blocks = nn.ModuleList(Block(dim) for _ in range(2))
        self.double_blocks = nn.ModuleList(Block(dim) for _ in range(3))
        self.head = nn.Linear(dim, 8)

    def forward(self, x):
        x = self.embed(x)
        for block in self.double_blocks:
            x = block(x)
        for block in self.single_blocks:
            x = block(x)
        return self.head(x)


class Interleaved(TwoListDiT):
    """Wan VACE's shape: blocks of two lists that run alternately."""

    def forward(self, x):
        x = self.embed(x)
        for i, block in enumerate(self.double_blocks):
            x = block(x)
            if i < len(self.single_blocks):
                x = self.single_blocks[i](x)
        return self.head(x)


class Nested(nn.Module):
    """LTX-2's shape: the block list lives one level down, under `model`."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.model = TinyDiT(dim, layers=3)

    def forward(self, x):
        return self.model(x)


class MixedBlock(nn.Module):
    """bf16 and fp32 weights in one block, a transposed weight and a strided (gapped) one."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.low = nn.Linear(dim, dim, dtype=torch.bfloat16)
        self.norm = nn.LayerNorm(dim)
        self.transposed = nn.Parameter(torch.randn(dim, dim).t())
        self.gapped = nn.Parameter(torch.randn(dim, 2 * dim)[:, ::2])
        self.scale = nn.Parameter(torch.randn(dim, dtype=torch.float16))

    def forward(self, x):
        y = self.low(x.to(torch.bfloat16)).float()
        y = self.norm(y) @ self.transposed @ self.gapped
        return x + y * self.scale.float()


class MixedModel(nn.Module):
    def __init__(self, dim: int = 16, layers: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(MixedBlock(dim) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


class WithEmptyBlock(nn.Module):
    """One block with no parameters at all, between two that have some."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(dim, dim)), nn.Sequential(nn.GELU()),
                                     nn.Sequential(nn.Linear(dim, dim))])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class TiedBlocks(nn.Module):
    """Blocks 0 and 2 share one weight, and the head shares block 1's."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(3))
        self.blocks[2].proj.weight = self.blocks[0].proj.weight
        self.head = nn.Linear(dim, dim)
        self.head.weight = self.blocks[1].proj.weight

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class TiedInsideBlock(nn.Module):
    """Two submodules of one block share a weight (a down and an up projection tied together)."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, dim)
        self.up = nn.Linear(dim, dim)
        self.up.weight = self.down.weight

    def forward(self, x):
        return x + self.up(F.gelu(self.down(self.norm(x))))


def tiny_input(batch: int = 2, tokens: int = 6, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, tokens, 8, dtype=dtype)


class OtherBlock(nn.Module):
    """A second kind of block, to mix with `Block` in one list."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class ListOf(nn.Module):
    """`layers`, a ModuleList of the given modules, called in order between an embedding and a head."""

    def __init__(self, layers, dim: int = 32):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(dim, 8)

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class PairList(nn.Module):
    """ConsisID's `local_facial_extractor.layers`: a ModuleList of [attention, feed-forward]
    ModuleLists, which are never called themselves; their members are."""

    def __init__(self, dim: int = 32, depth: int = 3):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([Block(dim), nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())])
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, 8)

    def forward(self, x):
        x = self.embed(x)
        for attn, ff in self.layers:
            x = ff(attn(x)) + x
        return self.head(x)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv = nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.pwconv(self.norm(self.dwconv(x.transpose(1, 2)).transpose(1, 2)))


class SequentialStack(TinyDiT):
    """LongCat audio DiT's shape: beside the block list, `text_conv`, an nn.Sequential of
    ConvNeXt blocks, and an MLP head that is a Sequential of plain layers."""

    def __init__(self, dim: int = 32):
        super().__init__(dim, layers=2)
        self.text_conv = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(3)])
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 8))

    def forward(self, x):
        x = self.text_conv(self.embed(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x)
