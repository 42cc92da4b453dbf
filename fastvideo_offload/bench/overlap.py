"""What the lanes of a step's timeline (measure.engine_timeline) say: how much of the staging
overlapped compute, and which staging pieces make up one fill. Plain numbers, no torch, like the
report that uses them."""

from __future__ import annotations


def staging_overlap(lanes: dict[str, list]) -> float | None:
    """The share of the time some staging thread was copying during which some block was computing;
    None when nothing was staged."""
    staging = _union([(s, s + n) for s, n, *_ in lanes["staging"]])
    busy = sum(end - start for start, end in staging)
    if not busy:
        return None
    compute = _union([(s, s + n) for s, n in lanes["compute"]])
    both = sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in staging for s2, e2 in compute)
    return both / busy


def fills(pieces: list) -> list[list]:
    """Staging pieces ([start, length, thread, block]) grouped by fill: a fill's pieces follow one
    another, and its block's next fill comes a step of compute later."""
    by_block: dict[int, list[list]] = {}
    for piece in sorted(pieces):
        runs = by_block.setdefault(piece[3], [])
        if runs and piece[0] <= 2 * max(p[0] + p[1] for p in runs[-1]) - runs[-1][0][0]:
            runs[-1].append(piece)
        else:
            runs.append([piece])
    return [fill for runs in by_block.values() for fill in runs]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Disjoint intervals covering the same time, so that an overlap is counted once."""
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(start, end) for start, end in merged]
