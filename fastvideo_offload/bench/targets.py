"""The benchmark's device targets (set for an H100 at Wan2.1-14B's block shape), judged from a
run's results: what was reached, against what limit, and whether it was met; three host targets
judged on any machine (loading from a checkpoint, one store per node); and checks that hold on
any machine: each budget row copies per step exactly its streamed blocks' bytes, and a LoRA
training step its streamed blocks both ways (with exact gradients on a CPU).

A target whose inputs a run did not measure (no GPU, a mode skipped, a section not reached
yet: the run judges after every mode) is reported with `met: None` and the reason, never as
met; so is the overhead when the resident reference moved by more than the margin judged.
"""

from __future__ import annotations

import torch

from .modes import STAGED, budget_modes

OVERHEAD_PCT = 1.0
PEAK_FACTOR = 1.1
COPY_RATE_FRACTION = 0.9
#: Budget = free memory on the short clip, against resident.
BUDGET_FACTOR = 1.05
BUDGET_AUTO = "ours budget auto"
#: A pin budget of PINNED_BLOCKS blocks (the rest staged) against every block pinned ("ours p1").
STAGING_FACTOR = 1.05
#: Host targets, judged on any machine: loading, against diffusers' way and the host store.
LOAD_SPEEDUP = 2.0
LOAD_PEAK_FACTOR = 1.05
#: Ranks of one node with share="node", against the store.
NODE_FACTOR = 1.1
#: A LoRA training step offloaded, against resident (a published musubi fork: about 5% on an H100).
TRAINING_OVERHEAD_PCT = 5.0


def _target(name: str, value: float, limit: float, unit: str, at_most: bool = True) -> dict:
    met = value <= limit if at_most else value >= limit
    return {"name": name, "value": value, "limit": limit, "unit": unit, "at_most": at_most, "met": met}


def _missing(name: str, unit: str, why: str) -> dict:
    return {"name": name, "value": None, "limit": None, "unit": unit, "met": None, "why": why}


def _modes(results: dict, section: str) -> dict:
    return results.get(section, {}).get("modes", {})


def _not_measured(results: dict, what: str) -> str:
    # A run judges after every mode: until it completes, what is missing may still come.
    return "not measured yet" if not results.get("complete") else f"{what} was not measured"


def overhead(results: dict, mode: str) -> dict:
    name = f"{mode}: time per step vs resident"
    row = _modes(results, "main").get(mode, {})
    if row.get("overhead_pct") is None:
        return _missing(name, "%", row.get("skipped") or _not_measured(results, "resident or this mode"))
    spread = results["main"].get("resident", {}).get("spread_pct")
    if spread is not None and spread > OVERHEAD_PCT:
        # The reference itself moved by more than the margin: the verdict would be noise.
        return _missing(name, "%", f"{row['overhead_pct']:+.1f}%, but the resident runs differ by {spread:.1f}%, "
                                   f"more than the {OVERHEAD_PCT:g}% judged")
    return _target(name, row["overhead_pct"], OVERHEAD_PCT, "%")


def peak_memory(results: dict, mode: str, prefetch: int) -> dict:
    """Bound: the weights outside the blocks, 1 + prefetch blocks, and the activations (the
    resident mode's peak less its weights)."""
    name = f"{mode}: peak device memory vs bound"
    rows = _modes(results, "main")
    peak, resident = rows.get(mode, {}).get("peak_device_bytes"), rows.get("resident", {}).get("peak_device_bytes")
    if peak is None or resident is None:
        if results["machine"].get("gpu") is not None:
            why = rows.get(mode, {}).get("skipped") or _not_measured(results, "resident or this mode")
            return _missing(name, "bytes", why)
        return _missing(name, "bytes", "peak device memory is measured on a GPU, with the resident mode beside")
    weights = results["weight_bytes"]
    activations = max(resident - weights["model"], 0)
    bound = weights["non_block"] + (1 + prefetch) * weights["block"] + activations
    return _target(name, peak, PEAK_FACTOR * bound, "bytes")


def copy_rate(results: dict, mode: str) -> dict:
    name = f"{mode}: short-clip copy rate vs ceiling"
    row = _modes(results, "short_clip").get(mode, {})
    rate, ceiling = row.get("h2d_GBps_per_step"), results.get("copy_ceiling_GBps")
    if rate is None or not ceiling:
        return _missing(name, "GB/s", row.get("skipped") or _not_measured(results, "the short clip"))
    return _target(name, rate, COPY_RATE_FRACTION * ceiling, "GB/s", at_most=False)


def budget_time(results: dict) -> dict:
    name = f"{BUDGET_AUTO}: short-clip time vs resident"
    section = results.get("short_clip", {})
    row, resident = section.get("modes", {}).get(BUDGET_AUTO, {}), section.get("resident", {})
    if row.get("median_ms") is None or resident.get("reference_ms") is None:
        return _missing(name, "x", row.get("skipped") or _not_measured(results, "resident or this mode"))
    ratio = row["median_ms"] / resident["reference_ms"]
    spread = resident.get("spread_pct")
    if spread is not None and spread > (BUDGET_FACTOR - 1) * 100:
        return _missing(name, "x", f"{ratio:.2f}x, but the resident runs differ by {spread:.1f}%, "
                                   f"more than the {(BUDGET_FACTOR - 1) * 100:g}% judged")
    return _target(name, ratio, BUDGET_FACTOR, "x")


def staging_time(results: dict) -> dict:
    name = f"{STAGED}: time per step vs every block pinned"
    rows = _modes(results, "main")
    staged, pinned = rows.get(STAGED, {}), rows.get("ours p1", {})
    if staged.get("median_ms") is None or pinned.get("median_ms") is None:
        return _missing(name, "x", staged.get("skipped") or _not_measured(results, "ours p1 or this mode"))
    return _target(name, staged["median_ms"] / pinned["median_ms"], STAGING_FACTOR, "x")


def budget_copies(results: dict, mode: str) -> dict:
    """In the main scenario and the short clip, bytes copied in a step at steady state against
    the bytes of the blocks the plan streams."""
    name = f"{mode}: bytes copied per step vs streamed blocks"
    rows = [results.get(s, {}).get("modes", {}).get(mode, {}) for s in ("main", "short_clip")]
    measured = [row["layout"] for row in rows if "layout" in row]
    if not measured:
        skipped = next((row["skipped"] for row in rows if "skipped" in row), None)
        return {**_missing(name, "bytes", skipped or _not_measured(results, "this mode")), "check": True}
    # The first that differs, if one does: a verdict on the other would hide it.
    shown = next((m for m in measured if m["copied_per_step"] != m["streamed_bytes"]), measured[0])
    return {"name": name, "value": shown["copied_per_step"], "limit": shown["streamed_bytes"], "unit": "bytes",
            "at_most": None, "met": shown["copied_per_step"] == shown["streamed_bytes"], "check": True}


def training_time(results: dict) -> dict:
    name = "training: LoRA step time vs resident"
    row = results.get("training", {})
    if "overhead_pct" not in row:
        return _missing(name, "%", row.get("failed") or _not_measured(results, "the training step"))
    return _target(name, row["overhead_pct"], TRAINING_OVERHEAD_PCT, "%")


def training_copies(results: dict) -> dict:
    """A LoRA step copies each streamed block once each way (less what the ring still holds), and
    on a CPU its gradients are the resident model's bit for bit."""
    name = "training: bytes copied per step vs streamed blocks both ways"
    row = results.get("training", {})
    if "h2d_bytes_per_step" not in row:
        return {**_missing(name, "bytes", row.get("failed") or _not_measured(results, "the training step")),
                "check": True}
    met = row["h2d_bytes_per_step"] == row["expected_h2d_bytes_per_step"]
    if results["machine"].get("gpu") is None:
        met = met and row["grads_exact"]
        name += ", gradients exact"
    return {"name": name, "value": row["h2d_bytes_per_step"], "limit": row["expected_h2d_bytes_per_step"],
            "unit": "bytes", "at_most": None, "met": met, "check": True}


def switch_stall(results: dict) -> dict:
    name = "Wan2.2 switch stall vs one block's copy"
    wan22 = results.get("wan22", {})
    if "switch_stall_ms" not in wan22:
        return _missing(name, "ms", wan22.get("failed") or _not_measured(results, "the Wan2.2 pair"))
    return _target(name, wan22["switch_stall_ms"], wan22["one_block_copy_ms"], "ms")


def load_speed(results: dict) -> dict:
    name = "load: diffusers' time / ours"
    load = results.get("load", {})
    ways = load.get("ways", {})
    if "diffusers_vs_ours" not in load:
        why = next((ways.get(w, {}).get("skipped") for w in ("ours", "diffusers") if "skipped" in ways.get(w, {})),
                   load.get("failed") or _not_measured(results, "the load"))
        return _missing(name, "x", why)
    return _target(name, load["diffusers_vs_ours"], LOAD_SPEEDUP, "x", at_most=False)


def load_peak(results: dict) -> dict:
    """Ours' peak RSS growth while loading, less the weights outside the blocks where the device
    is the CPU (there they are host memory too), against the host store."""
    name = "load: ours' peak RSS growth vs store"
    load = results.get("load", {})
    ours = load.get("ways", {}).get("ours", {})
    if "x_store" not in ours:
        return _missing(name, "x", ours.get("skipped") or load.get("failed") or _not_measured(results, "the load"))
    return _target(name, ours["x_store"], LOAD_PEAK_FACTOR, "x")


def node_shared(results: dict) -> dict:
    """The largest of the measured rank counts' host bytes per node with share="node", filled
    from loaded weights or from a checkpoint."""
    name = "node: host bytes, shared, vs store (worst N and way)"
    node = results.get("node", {})
    measured = [row[way]["x_store"] for row in node.get("ranks", {}).values() for way in ("shared", "checkpoint")
                if "x_store" in row.get(way, {})]
    if not measured:
        return _missing(name, "x", node.get("failed") or _not_measured(results, "the node"))
    return _target(name, max(measured), NODE_FACTOR, "x")


def judge(results: dict) -> list[dict]:
    judged = [
        overhead(results, "ours p1"),
        overhead(results, "ours p2"),
        peak_memory(results, "ours p1", 1),
        peak_memory(results, "ours p2", 2),
        copy_rate(results, "ours p1"),
        copy_rate(results, "ours p2"),
        switch_stall(results),
        budget_time(results),
        staging_time(results),
        training_time(results),
    ]
    gpu = results["machine"].get("gpu") is not None
    if not gpu:
        # On a CPU "device" memory is host memory and a copy is a memcpy: the numbers are
        # reported, but against limits set for a GPU they would mean nothing.
        judged = [_missing(t["name"], t["unit"], "not measured: the targets are for a GPU; this run was on a CPU")
                  for t in judged]
    device = torch.device("cuda" if gpu else "cpu")
    host = [{**t, "host": True} for t in (load_speed(results), load_peak(results), node_shared(results))]
    return judged + host + [budget_copies(results, mode) for mode in budget_modes(device)] + [training_copies(results)]
