"""A Wan-architecture DiT with random weights: the benchmark's built-in model.

The block is Wan2.1's: self-attention with RMS-normed q/k, cross-attention to the text, a
GELU FFN and the six-way timestep modulation. RoPE and the 3-D patch convolution are left
out; they cost little next to the blocks and do not change what is offloaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class WanShape:
    dim: int
    heads: int
    ffn: int
    layers: int
    text_dim: int = 4096
    text_len: int = 512
    in_channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256

    def tokens(self, frames: int, height: int, width: int) -> int:
        """Sequence length of a video: VAE 4x in time, 8x in space, then the patch size."""
        t, h, w = self.patch
        return ((frames - 1) // 4 + 1) // t * (height // 8 // h) * (width // 8 // w)

    def as_dict(self) -> dict:
        return asdict(self)


#: Wan2.1-14B's block shape (about 0.7 GB per block in bf16).
WAN_14B = WanShape(dim=5120, heads=40, ffn=13824, layers=40)
#: Small enough for a CPU run of a few seconds per mode.
CPU_SMALL = WanShape(dim=512, heads=8, ffn=1536, layers=8, text_dim=256, text_len=32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(dim), RMSNorm(dim)

    def forward(self, x, context=None):
        b, n, d = x.shape
        source = x if context is None else context
        q = self.norm_q(self.q(x)).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.norm_k(self.k(source)).view(b, source.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v(source).view(b, source.shape[1], self.heads, -1).transpose(1, 2)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class WanBlock(nn.Module):
    def __init__(self, shape: WanShape):
        super().__init__()
        d = shape.dim
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False)
        self.self_attn = Attention(d, shape.heads)
        self.norm3 = nn.LayerNorm(d)
        self.cross_attn = Attention(d, shape.heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, shape.ffn), nn.GELU(approximate="tanh"), nn.Linear(shape.ffn, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / math.sqrt(d))

    def forward(self, x, context, e):
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).chunk(6, dim=1)
        x = x + self.self_attn(self.norm1(x) * (1 + scale1) + shift1) * gate1
        x = x + self.cross_attn(self.norm3(x), context)
        return x + self.ffn(self.norm2(x) * (1 + scale2) + shift2) * gate2


class WanLikeDiT(nn.Module):
    def __init__(self, shape: WanShape):
        super().__init__()
        self.shape = shape
        d = shape.dim
        patch_in = shape.in_channels * math.prod(shape.patch)
        self.patch_embedding = nn.Linear(patch_in, d)
        self.text_embedding = nn.Sequential(nn.Linear(shape.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(shape.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(WanBlock(shape) for _ in range(shape.layers))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False)
        self.head = nn.Linear(d, patch_in)
        self.register_buffer("freqs", time_frequencies(shape.freq_dim), persistent=False)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """latents: (batch, tokens, in_channels * patch volume), already patchified."""
        angles = timestep.float()[:, None] * self.freqs[None]
        t = self.time_embedding(torch.cat([angles.cos(), angles.sin()], dim=-1).to(latents.dtype))
        e = self.time_projection(t).unflatten(1, (6, -1))
        x = self.patch_embedding(latents)
        context = self.text_embedding(context)
        for block in self.blocks:
            x = block(x, context, e)
        return self.head(self.norm_out(x))


def time_frequencies(freq_dim: int) -> torch.Tensor:
    """The sinusoidal timestep embedding's frequencies: a buffer no checkpoint holds."""
    half = freq_dim // 2
    return torch.exp(-math.log(10000) * torch.arange(half) / half)


class IdleWanBlock(WanBlock):
    """A Wan block's weights with a forward that does no work: what an offloader adds to a
    block call is then all that a call costs beyond nn.Module's own dispatch."""

    def forward(self, x):
        return x


class IdleBlocks(nn.Module):
    def __init__(self, shape: WanShape):
        super().__init__()
        self.blocks = nn.ModuleList(IdleWanBlock(shape) for _ in range(shape.layers))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def build(shape: WanShape, dtype: torch.dtype, device: torch.device | str = "cpu") -> WanLikeDiT:
    """Random weights, made on `device` (fast on a GPU) directly in `dtype`, so a 14B model never
    exists in fp32."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WanLikeDiT(shape)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def build_empty(shape: WanShape, dtype: torch.dtype) -> WanLikeDiT:
    """The model on the meta device, to be loaded from a checkpoint; its non-persistent buffer made
    real, as accelerate's init_empty_weights() leaves buffers."""
    model = build(shape, dtype, "meta")
    model.register_buffer("freqs", time_frequencies(shape.freq_dim), persistent=False)
    return model


def weight_bytes(shape: WanShape, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of the whole model's weights, of one block's and of those outside the blocks,
    counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = WanLikeDiT(replace(shape, layers=1))
    block = sum(p.numel() for p in model.blocks[0].parameters()) * dtype.itemsize
    rest = sum(t.numel() for t in (*model.parameters(), *model.buffers())) * dtype.itemsize - block
    return {"model": rest + shape.layers * block, "block": block, "non_block": rest}


def inputs(shape: WanShape, tokens: int, dtype: torch.dtype, device, batch: int = 1):
    g = torch.Generator(device="cpu").manual_seed(0)
    latents = torch.randn(batch, tokens, shape.in_channels * math.prod(shape.patch), generator=g)
    context = torch.randn(batch, shape.text_len, shape.text_dim, generator=g)
    timestep = torch.full((batch,), 500.0)
    return latents.to(device, dtype), timestep.to(device), context.to(device, dtype)
