"""The training scenario: LoRA steps (forward, backward, AdamW) on the built-in model, offloaded against
resident: step time, bytes copied per step against the streamed blocks' two ways, peak device
memory, and whether the LoRA gradients are bit-identical (a CPU criterion: on a GPU attention's
backward is not deterministic, so the largest difference is reported)."""

from __future__ import annotations

import copy
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from .. import api
from . import measure
from .model import WanShape, build, inputs

RANK = 16


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (B non-zero, so every gradient is)."""

    def __init__(self, base: nn.Linear, rank: int = RANK):
        super().__init__()
        self.base = base
        dtype, device = base.weight.dtype, base.weight.device
        self.A = nn.Parameter(torch.randn(rank, base.in_features, dtype=dtype, device=device) / base.in_features**0.5)
        self.B = nn.Parameter(torch.randn(base.out_features, rank, dtype=dtype, device=device) * 1e-3)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.A), self.B)


def with_lora(model: nn.Module) -> nn.Module:
    """The base frozen, LoRA on every block's self-attention projections, in training mode (in which
    enable() keeps the LoRA parameters on the device)."""
    model.requires_grad_(False).train()
    for block in model.blocks:
        attn = block.self_attn
        attn.q, attn.k, attn.v, attn.o = (LoRALinear(m) for m in (attn.q, attn.k, attn.v, attn.o))
    return model


def _steps(model, optimizer, make_inputs, steps: int, device, warmup: int):
    """Timed steps; the LoRA gradients of the first timed step."""
    times, grads = [], None
    for step in range(warmup + steps):
        args = make_inputs(step)

        def one_step():
            optimizer.zero_grad()
            model(*args).float().pow(2).mean().backward()
            optimizer.step()

        seconds, _ = measure.timed(one_step, device)
        if step == warmup:
            grads = [p.grad.clone() for p in optimizer.param_groups[0]["params"]]
        if step >= warmup:
            times.append(seconds * 1e3)
    return statistics.median(times), grads


def compare(shape: WanShape, dtype: torch.dtype, device: torch.device, tokens: int, steps: int, warmup: int,
            prefetch: int = 1) -> dict:
    measure.free_memory(device)
    torch.manual_seed(0)
    base = with_lora(build(shape, dtype))
    resident = copy.deepcopy(base).to(device)

    def make_inputs(step: int):
        return inputs(shape, tokens, dtype, device)

    def optimizer(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    resident_ms, resident_grads = _steps(resident, optimizer(resident), make_inputs, steps, device, warmup)
    resident_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del resident
    measure.free_memory(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    handle = api.enable(base, device=device, prefetch=prefetch)
    opt = optimizer(base)
    before = {}

    def counted(step: int):
        if step == warmup:
            before.update(handle.stats())
        return make_inputs(step)

    offloaded_ms, grads = _steps(base, opt, counted, steps, device, warmup)
    after = handle.stats()
    offloaded_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    streamed = after["streamed_blocks"]
    ring = min(after["prefetch"] + 1, streamed)
    exact = all(torch.equal(a, b) for a, b in zip(resident_grads, grads))
    max_diff = max(((a.float() - b.float()).abs().max().item() for a, b in zip(resident_grads, grads)), default=0.0)
    result = {
        "tokens": tokens,
        "prefetch": after["prefetch"],
        "lora_params": sum(p.numel() for p in opt.param_groups[0]["params"]),
        "resident_ms": resident_ms,
        "offloaded_ms": offloaded_ms,
        "overhead_pct": 100.0 * (offloaded_ms / resident_ms - 1.0),
        "h2d_bytes_per_step": (after["h2d_bytes"] - before["h2d_bytes"]) // steps,
        # Each way, the streamed blocks the ring does not still hold from the pass before.
        "expected_h2d_bytes_per_step": 2 * (streamed - ring) * after["slot_bytes"],
        "backward_uploads_per_step": (after["backward_uploads"] - before["backward_uploads"]) / steps,
        "grads_exact": exact,
        "grads_max_abs_diff": max_diff,
        "resident_peak_device_bytes": resident_peak,
        "offloaded_peak_device_bytes": offloaded_peak,
        "slot_bytes": after["device_bytes"],
    }
    handle.disable()
    del base, opt
    measure.free_memory(device)
    return result
