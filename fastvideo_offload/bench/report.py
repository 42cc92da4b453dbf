"""The benchmark's output: a terminal table, a JSON file and a PNG."""

from __future__ import annotations

import json
import os

from . import overlap
from .modes import STAGED, STREAM_ALL

GiB = 2**30
MB = 1e6

#: What a CPU run can and cannot show, printed under its table.
CPU_CAVEAT = (
    "on a CPU, device memory is host memory: diffusers and accelerate move CPU weights to the CPU and copy nothing, "
    "while ours copies every block (a memcpy) into its slots, so the step times do not compare the offloaders' "
    "copy costs; the hooks' host time per block is the comparison that holds, and the async row shows our copies "
    "overlapping compute on a worker thread"
)


def _num(value, fmt: str, empty: str = "-") -> str:
    return empty if value is None else format(value, fmt)


def _resident_line(section: dict) -> str:
    resident = section.get("resident")
    if resident is None:
        return "  overhead: no resident run to measure it against"
    runs = ", ".join(f"{name} {ms:.1f}" for name, ms in resident["runs_ms"].items())
    spread = resident["spread_pct"]
    apart = "measured once, spread unknown" if spread is None else f"spread {spread:.1f}%"
    return f"  overhead vs the {resident['reference']} ({resident['reference_ms']:.1f} ms; {runs} ms; {apart})"


def _mode_table(rows: dict, ceiling: float) -> list[str]:
    head = (f"  {'mode':<24}{'step ms':>10}{'overhead':>10}{'peak dev GiB':>14}{'host GiB':>10}{'H2D GB/s':>10}"
            f"{'exact':>7}")
    lines = [head]
    for name, row in rows.items():
        if "skipped" in row:
            lines.append(f"  {name:<24}skipped: {row['skipped']}")
            continue
        rate = row.get("h2d_GBps_per_step")
        rate_text = "-" if rate is None else f"{rate:.1f}" + (f" ({rate / ceiling:.0%})" if ceiling else "")
        exact = {True: "yes", False: "NO", None: "-"}[row.get("bit_identical")]
        peak = row.get("peak_device_bytes")
        host = row.get("host_bytes") or row.get("pinned_by_torch_bytes")
        lines.append(
            f"  {name:<24}{row['median_ms']:>10.1f}{_num(row.get('overhead_pct'), '+.1f'):>9}%"
            f"{_num(peak and peak / GiB, '.2f'):>14}{_num(host and host / GiB, '.2f'):>10}{rate_text:>10}{exact:>7}"
        )
    return lines


def _overlap_lines(rows: dict) -> list[str]:
    return [
        f"  {name}: staging overlapped compute {row['staging_overlap']:.0%} of its time (one step's timeline, "
        f"{_threads(row['engine']['staging_threads'])})"
        for name, row in rows.items() if "staging_overlap" in row
    ]


def _threads(n: int) -> str:
    return f"{n} staging thread" + ("s" if n != 1 else "")


def _budget_rows(rows: dict) -> dict:
    """This engine streaming every block and the budget rows: the layouts side by side."""
    return {n: r for n, r in rows.items() if "layout" in r and (n == STREAM_ALL or "device_budget" in r)}


def _budget_table(rows: dict) -> list[str]:
    if not any("device_budget" in r for r in rows.values()):
        return []
    lines = [f"  {'device budget':<24}{'budget MB':>10}{'resident':>10}{'streamed':>10}{'copied MB':>11}"
             f"{'streamed MB':>13}{'vs resident':>13}{'vs ' + STREAM_ALL:>12}"]
    for name, row in _budget_rows(rows).items():
        layout, budget = row["layout"], row.get("device_budget")
        resident, streamed = len(layout["resident"]), len(layout["streamed"])
        budget_text = "-" if budget is None else budget if isinstance(budget, str) else f"{budget / MB:.1f}"
        lines.append(
            f"  {name:<24}{budget_text:>10}{f'{resident}/{resident + streamed}':>10}"
            f"{f'{streamed}/{resident + streamed}':>10}{layout['copied_per_step'] / MB:>11.2f}"
            f"{layout['streamed_bytes'] / MB:>13.2f}{_pct(row.get('overhead_pct')):>13}"
            f"{_pct(row.get('vs_stream_all_pct')):>12}"
        )
    return lines


#: The ways of loading, as the table names them.
LOAD_WAYS = {"ours": "ours: meta + enable(checkpoint=)", "diffusers": "diffusers: full model + group offload",
             "fastvideo": "fastvideo: its loader + offload"}


def _load_table(section: dict) -> list[str]:
    on_host = ("; on this CPU device they count in RSS and are left out of x store"
               if section["non_block_on_host"] else "")
    lines = [f"  {'way':<40}{'seconds':>9}{'peak RSS MB':>13}{'x store':>9}{'max abs diff':>14}"]
    for way, row in section["ways"].items():
        label = LOAD_WAYS.get(way, way)
        if "skipped" in row or "unavailable" in row:
            what = "skipped" if "skipped" in row else "unavailable"
            lines.append(f"  {label:<40}{what}: {row[what]}")
            continue
        lines.append(f"  {label:<40}{row['seconds']:>9.3f}{row['peak_rss_bytes'] / MB:>13.1f}{row['x_store']:>9.2f}"
                     f"{_num(row.get('max_abs_diff'), '.1e'):>14}")
    if "diffusers_vs_ours" in section:
        lines.append(f"  diffusers' way takes {section['diffusers_vs_ours']:.1f}x ours' time{on_host}")
    return lines


#: The node section's columns: how the ranks enabled, and its heading.
_NODE_COLUMNS = (("shared", "shared MB"), ("checkpoint", "shared, from ckpt MB"), ("unshared", "unshared MB"))


def _node_table(section: dict) -> list[str]:
    lines = [f"  {'ranks':<8}" + "".join(f"{title:>22}{'x store':>9}" for _, title in _NODE_COLUMNS)]
    for n, row in section["ranks"].items():
        cells = []
        for key, _ in _NODE_COLUMNS:
            cell = row.get(key, {})
            if "node_bytes" in cell:
                cells.append(f"{cell['node_bytes'] / MB:>22.1f}{cell['x_store']:>9.2f}")
            else:
                cells.append(f"  {key}: {cell.get('skipped', 'not run')}")
        lines.append(f"  {n:<8}" + "".join(cells))
    return lines


def _pct(value) -> str:
    return "-" if value is None else f"{value:+.1f}%"


def _target_line(target: dict) -> str:
    verdict = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
    if target["met"] is None:
        return f"  {target['name']:<46}{verdict:>7}  ({target['why']})"
    if target["at_most"] is None:  # an equality, in exact numbers
        relation = "==" if target["met"] else "!="
        value = f"{target['value']:,} {relation} {target['limit']:,} {target['unit']}"
        return f"  {target['name']:<46}{verdict:>7}  {value}"
    scale, unit = (GiB, "GiB") if target["unit"] == "bytes" else (1, target["unit"])
    value, limit = target["value"] / scale, target["limit"] / scale
    relation = ("<=" if target["met"] else ">") if target["at_most"] else (">=" if target["met"] else "<")
    return f"  {target['name']:<46}{verdict:>7}  {value:.2f} {relation} {limit:.2f} {unit}"


def table(results: dict) -> str:
    m, shape, video = results["machine"], results["shape"], results["video"]
    where = m.get("gpu") or f"CPU ({m['cpu_threads']} threads)"
    out = [
        f"fastvideo_offload bench on {where}, torch {m['torch']}" + (f", CUDA {m['cuda']}" if m.get("cuda") else ""),
        f"model: Wan-shaped DiT, {shape['layers']} blocks of dim {shape['dim']} / FFN {shape['ffn']}, "
        f"{results['dtype']}, {results['weight_bytes']['block'] / GiB:.3f} GiB per block",
        f"host-to-device ceiling (one large pinned copy): {results['copy_ceiling_GBps']:.1f} GB/s",
    ]
    ceiling = results["copy_ceiling_GBps"]
    complete = results.get("complete", True)
    for name, title in (
        ("main", f"{video['frames']} frames at {video['height']}x{video['width']} ({video['tokens']} tokens), "
                 "per denoising step:"),
        ("short_clip", "short clip, {frames} frames ({tokens} tokens):"),
        ("wan22", "Wan2.2 pair ({layers} blocks each, {tokens} tokens), expert switch after step {switch_step}:"),
        ("hooks", "hook overhead, host time per block per step ({layers} near-empty blocks):"),
        ("training", "training, LoRA steps (forward + backward + AdamW, {tokens} tokens, prefetch {prefetch}, "
                     "{lora_params} LoRA parameters):"),
        ("pack_GBps", "host packing:"),
        ("staging_GBps", "host staging (pageable blocks -> pinned ring -> slot, no compute, each byte copied twice):"),
        ("load", "load, checkpoint on disk -> ready to run ({files} safetensors shards, host store "
                 "{store_bytes_mb:.1f} MB, {non_block_bytes_mb:.1f} MB of weights outside the blocks):"),
        ("node", "node, host bytes per node (the ranks' PSS growth less device slots and weights outside the "
                 "blocks), store {store_bytes_mb:.1f} MB:"),
    ):
        if name not in results:
            out += ["", f"{name}: not run" + ("" if complete else " yet")]
            continue
        section = results[name]
        if "failed" in section:
            out += ["", f"{name}: failed: {section['failed']}"]
            if "modes" not in section:
                continue
        in_mb = {f"{k}_mb": v / MB for k, v in section.items() if k.endswith("_bytes") and v is not None}
        out += ["", title.format(**section, **in_mb)]
        if name in ("main", "short_clip"):
            out += _mode_table(section["modes"], ceiling)
            out.append(_resident_line(section))
            out += _overlap_lines(section["modes"])
            out += _budget_table(section["modes"])
        elif name == "wan22":
            out.append(
                f"  switch stall {section['switch_stall_ms']:.1f} ms (one block's copy at the ceiling: "
                f"{section['one_block_copy_ms']:.1f} ms); idle expert holds {section['idle_expert_device_bytes']} "
                "device bytes after the switch"
            )
        elif name == "hooks":
            for mode, row in section["modes"].items():
                if "skipped" in row:
                    out.append(f"  {mode:<24}skipped: {row['skipped']}")
                elif "us_per_block" in row:
                    out.append(f"  {mode:<24}{row['us_per_block']:>8.1f} us")
        elif name == "training":
            out += _training_lines(section)
        elif name == "load":
            out += _load_table(section)
        elif name == "node":
            out += _node_table(section)
        else:
            out[-1] += " " + ", ".join(f"{k.replace('_', ' ')}: {v:.2f} GB/s" for k, v in section.items())
    judged = [t for t in results.get("targets", []) if not t.get("check") and not t.get("host")]
    host = [t for t in results.get("targets", []) if t.get("host")]
    checks = [t for t in results.get("targets", []) if t.get("check")]
    reasons = {t.get("why") for t in judged}
    if judged and all(t["met"] is None for t in judged) and len(reasons) == 1:
        out += ["", f"targets (set for an H100 at the 14B block shape, 480x832x81): not judged: {reasons.pop()}"]
    elif judged:
        out += ["", "targets (set for an H100 at the 14B block shape, 480x832x81):"]
        out += [_target_line(t) for t in judged]
    if host:
        out += ["", "host targets (any machine):"] + [_target_line(t) for t in host]
    if checks:
        out += ["", "checks (any machine):"] + [_target_line(t) for t in checks]
    if not m.get("gpu"):
        out += ["", CPU_CAVEAT]
    if not complete:
        out += ["", "(run not finished: what is missing was not measured yet)"]
    return "\n".join(out)


def _training_lines(section: dict) -> list[str]:
    lines = [
        f"  step {section['offloaded_ms']:.1f} ms offloaded, {section['resident_ms']:.1f} ms resident "
        f"({section['overhead_pct']:+.1f}%)",
        f"  copied per step {section['h2d_bytes_per_step'] / MB:.1f} MB (streamed blocks both ways, less the ring: "
        f"{section['expected_h2d_bytes_per_step'] / MB:.1f} MB), {section['backward_uploads_per_step']:.1f} "
        "backward uploads",
        "  LoRA gradients " + ("bit-identical to resident" if section["grads_exact"]
                               else f"differ from resident by at most {section['grads_max_abs_diff']:.3g}"),
    ]
    if section.get("offloaded_peak_device_bytes") is not None:
        lines.append(f"  peak device memory {section['offloaded_peak_device_bytes'] / MB:.0f} MB offloaded, "
                     f"{section['resident_peak_device_bytes'] / MB:.0f} MB resident (slots "
                     f"{section['slot_bytes'] / MB:.0f} MB)")
    return lines


def _make_parent(path: str) -> str:
    # `--json out/bench.json` into a folder that does not exist yet is what a user types first.
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def write_table(results: dict, path: str) -> None:
    with open(_make_parent(path), "w") as f:
        f.write(table(results) + "\n")


def write_json(results: dict, path: str) -> None:
    with open(_make_parent(path), "w") as f:
        json.dump(results, f, indent=1)


def plot(results: dict, path: str) -> None:
    """Overhead and peak memory per mode, this engine's copy/compute timeline, the same with staging
    for the staged row, and the planner's layout under each device budget."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from exc

    rows = {k: v for k, v in results.get("main", {}).get("modes", {}).items() if "median_ms" in v}
    fig = plt.figure(figsize=(10, 17))
    # The staged row's step is drawn whole and, beside it, around one fill: on a CPU a fill is too
    # short to see at the scale of a step.
    grid = fig.add_gridspec(5, 2, height_ratios=[1, 1, 1.2, 1.2, 0.9], width_ratios=[3, 1])
    axes = [fig.add_subplot(grid[i, :]) for i in range(3)]
    axes += [fig.add_subplot(grid[3, 0]), fig.add_subplot(grid[3, 1]), fig.add_subplot(grid[4, :])]
    names = list(rows)
    overhead = [rows[n].get("overhead_pct") or 0.0 for n in names]
    colors = ["#888" if n.startswith("resident") else "#2a7" if n.startswith("ours") else "#c64" for n in names]
    axes[0].bar(names, overhead, color=colors)
    axes[0].axhline(0, color="black", linewidth=0.8)
    reference = results.get("main", {}).get("resident", {})
    label = f"time per step vs {reference.get('reference', 'resident')} (%)"
    if reference.get("spread_pct") is not None:
        label += f"\nresident runs {reference['spread_pct']:.1f}% apart"
    axes[0].set_ylabel(label)
    axes[0].set_title(f"{results['machine'].get('gpu') or 'CPU'}: {results['video']['tokens']} tokens, "
                      f"{results['shape']['layers']} blocks")
    memory = [(rows[n].get("peak_device_bytes") or 0) / GiB for n in names]
    if any(memory):
        axes[1].bar(names, memory, color="#47a")
        axes[1].set_ylabel("peak device memory (GiB)")
    else:
        host = [(rows[n].get("host_bytes") or 0) / GiB for n in names]
        axes[1].bar(names, host, color="#47a")
        axes[1].set_ylabel("host store (GiB, ours)")
    for ax in axes[:2]:  # mode names are long: slanted, they do not run into each other
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    timeline = rows.get("ours p1", {}).get("timeline")
    if timeline:
        axes[2].broken_barh(timeline["compute"], (10, 8), color="#2a7")
        axes[2].broken_barh(timeline["copy"], (0, 8), color="#c64")
        axes[2].set_yticks([4, 14], ["copy", "compute"])
        axes[2].set_xlabel("ms from the start of one step (ours, prefetch 1)")
    else:
        axes[2].axis("off")
    _staged_timeline(axes[3], axes[4], rows.get(STAGED, {}))
    _layout_strips(axes[5], _budget_rows(rows))
    fig.tight_layout()
    fig.savefig(_make_parent(path), dpi=110)
    plt.close(fig)


def _staged_timeline(ax, zoom, row: dict) -> None:
    """The staged row's step: a lane per staging thread (its pieces shaded by block), copy and
    compute; and, in `zoom`, the same around one fill."""
    timeline = row.get("timeline")
    if not timeline or not timeline["staging"]:
        ax.axis("off")
        zoom.axis("off")
        return
    stats = row["engine"]
    threads = stats["staging_threads"]
    lanes = []
    for t in range(threads):
        pieces = [p for p in timeline["staging"] if p[2] == t]
        lanes.append((f"staging thread {t}", [p[:2] for p in pieces], ["#47a" if p[3] % 2 else "#9bd" for p in pieces]))
    lanes += [("copy", timeline["copy"], "#c64"), ("compute", timeline["compute"], "#2a7")]
    for axis in (ax, zoom):
        for y, (label, spans, shades) in enumerate(lanes):
            # An outline keeps a fill or copy of a ms visible in a step of seconds; the compute bars
            # keep the gaps between them.
            outline = 0 if label == "compute" else 0.8
            axis.broken_barh(spans, (y * 10, 8), facecolors=shades, edgecolors=shades, linewidth=outline)
        axis.set_yticks([y * 10 + 4 for y in range(len(lanes))], [label for label, *_ in lanes])
    ax.set_title(f"{STAGED}: {stats['staged_blocks']} of {stats['blocks']} blocks staged by {_threads(threads)}\n"
                 f"staging overlapped compute {row['staging_overlap']:.0%} of its time")
    ax.set_xlabel("ms from the start of one step (prefetch 1)")
    # A fill is a few ms on a CPU: the zoom shows the one that overlapped compute most, saying so,
    # beside the share of the whole step above.
    share, fill = max(((overlap.staging_overlap({"staging": f, "compute": timeline["compute"]}) or 0.0, f)
                       for f in overlap.fills(timeline["staging"])), key=lambda pair: pair[0])
    start, end = fill[0][0], max(p[0] + p[1] for p in fill)
    zoom.set_xlim(start - (end - start), end + (end - start))
    zoom.tick_params(labelleft=False)
    zoom.set_title(f"block {fill[0][3]}'s fill, zoomed:\n{share:.0%} under compute\n(the step's most)", fontsize=9)
    zoom.set_xlabel("ms")


def _layout_strips(ax, rows: dict) -> None:
    """One strip per budget row: its blocks in execution order, resident or streamed."""
    if not any("device_budget" in r for r in rows.values()):
        ax.axis("off")
        return
    for y, row in enumerate(reversed(rows.values())):
        ax.broken_barh([(i, 0.9) for i in row["layout"]["resident"]], (y, 0.8), color="#888")
        ax.broken_barh([(i, 0.9) for i in row["layout"]["streamed"]], (y, 0.8), color="#c64")
    ax.set_yticks([y + 0.4 for y in range(len(rows))], [
        f"{name}\n{len(r['layout']['resident'])} resident, {r['layout']['copied_per_step'] / MB:.1f} MB/step"
        for name, r in reversed(rows.items())
    ])
    first = next(iter(rows.values()))["layout"]
    blocks = len(first["resident"]) + len(first["streamed"])
    ax.set_xticks([i + 0.45 for i in range(blocks)], range(blocks))
    ax.set_xlabel("block, in execution order (grey: resident, copied once; red: streamed every step)")
