"""Which blocks stay on the device under a device budget, and which stream: a pure function."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    resident: tuple[int, ...]  # blocks copied once and kept
    streamed: tuple[int, ...]  # blocks copied every step, through the ring of slots
    device_bytes: int  # the most the blocks take on the device: resident blocks + the ring
    streamed_bytes: int  # copied per step once the resident blocks are in


def ring_slots(prefetch: int, blocks: int) -> int:
    """The ring's slots for `blocks` streamed `prefetch` ahead: the running block's and one per
    prefetched block, of which there can be no more than the other blocks."""
    return min(prefetch, max(blocks - 1, 0)) + 1


def spread(n: int, count: int) -> list[int]:
    """`count` of `n` positions spread evenly, so that each streamed block has resident blocks before
    it whose compute hides its copy (not the last `count`, which would copy back to back)."""
    return [int((j + 0.5) * n / count) for j in range(count)]


def plan(sizes: Sequence[int], budget: int, slots: int) -> Plan:
    """`sizes`: each block's bytes, in execution order; `budget`: the device bytes the blocks may take;
    `slots`: ring slots for streamed blocks (ring_slots), each as large as the largest streamed
    block; no more of them fill than there are streamed blocks. Streams the fewest blocks that fit
    the budget, spread evenly through the order: for blocks of one size (a DiT's) that keeps the
    most blocks resident that any choice could; with mixed sizes it may keep fewer, since the
    spread picks positions, not sizes.

    Raises ValueError when even streaming every block does not fit."""
    n = len(sizes)
    if budget < 0 or slots < 1:
        raise ValueError(f"plan needs a budget >= 0 and at least one slot, got {budget} and {slots}")
    for count in range(n + 1):
        streamed = spread(n, count)
        chosen = set(streamed)
        resident = [i for i in range(n) if i not in chosen]
        ring = min(slots, count) * max((sizes[i] for i in streamed), default=0)
        need = sum(sizes[i] for i in resident) + ring
        if need <= budget:
            return Plan(tuple(resident), tuple(streamed), need, sum(sizes[i] for i in streamed))
    raise ValueError(
        f"device_budget: {budget} bytes for the blocks is less than streaming needs: {slots} slot(s) of the "
        f"largest block, {slots * max(sizes, default=0)} bytes; raise the budget or lower prefetch"
    )
