"""gpu_check.sh's last part: one screen from what the parts wrote, printed and saved as summary.txt.

Reads the parts' table (name, limit, seconds, outcome), probe.txt, ninja's log of the build (its
slowest compile units), correctness.txt, tests.txt (the supervisor's summaries and failures) and
bench.json (the rows of the main scenario and the targets' verdicts). Standard library only: it
must run when the build did not. Exits 1 when the output folder holds more than 8 files (what a
device call brings back) or the parts' limits add up to more than 390 s.

Usage: python scripts/gpu_summary.py OUTPUT_DIR STATE_DIR [--elapsed SECONDS] [--dry-run]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

MAX_FILES = 8
MAX_TOTAL_S = 390
WIDTH = 110


def parts(state: str) -> list[list[str]]:
    with open(os.path.join(state, "parts.tsv")) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def slowest_units(build_dir: str, since: float | None, count: int = 3) -> list[tuple[str, float]]:
    """The compile units of the last build that took longest, from ninja's log (`# ninja log v5`
    and later: start ms, end ms, mtime, output, hash per line; a unit built again has a later
    line). Units whose output is older than `since` (a build before this one) are left out."""
    logs = sorted(glob.glob(os.path.join(build_dir, "temp.*", ".ninja_log")), key=os.path.getmtime)
    if not logs:
        return []
    units: dict[str, float] = {}
    with open(logs[-1]) as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if line.startswith("#") or len(fields) < 4:
                continue
            output = fields[3] if os.path.isabs(fields[3]) else os.path.join(os.path.dirname(logs[-1]), fields[3])
            units[output] = (int(fields[1]) - int(fields[0])) / 1e3
    if since is not None:
        units = {o: s for o, s in units.items() if os.path.exists(o) and os.path.getmtime(o) >= since}
    top = sorted(units.items(), key=lambda unit: -unit[1])[:count]
    return [(os.path.relpath(o, os.path.dirname(logs[-1])), s) for o, s in top]


def _lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [line.rstrip("\n") for line in f]
    except OSError:
        return []


def probe(out: str) -> list[str]:
    shown = []
    for line in _lines(os.path.join(out, "probe.txt")):
        name = line.split(":", 1)[0]
        if name not in ("torch", "host memory", "arch", "probe") and ":" in line and not line.startswith("=="):
            shown.append("  " + line.rsplit("  [", 1)[0])
    return shown or ["  (no probe output)"]


#: How a case line of the correctness script ends (`name   VERDICT ...`).
VERDICT = re.compile(r"\s(EXACT|MISMATCH|ERROR|NOT RUN)\b")


def correctness(out: str) -> list[str]:
    lines = _lines(os.path.join(out, "correctness.txt"))
    cases = [line for line in lines if not line.startswith(" ") and VERDICT.search(line)]
    if not cases:
        return ["  (no case ran)"] + [f"  {line}" for line in lines[-3:]]
    final = next((line for line in reversed(lines) if line.startswith("correctness:")), "no final line: stopped?")
    exact = sum(VERDICT.search(line).group(1) == "EXACT" for line in cases)
    shown = [f"  {exact} of {len(cases)} cases EXACT; {final}"]
    shown += [f"  {line}" for line in cases if VERDICT.search(line).group(1) != "EXACT"]
    shown += [f"  {line.strip()}" for line in lines if line.startswith("  bytes")]
    return shown


def tests(out: str, failures: int = 6) -> list[str]:
    shown = []
    for line in _lines(os.path.join(out, "tests.txt")):
        if line.startswith("== "):
            shown.append("  " + line[3:])
        elif line.split(" ", 1)[0] in ("FAILED", "ERROR", "HUNG", "CRASHED") and " - " in line and failures:
            shown.append("    " + line)
            failures -= 1
    return shown or ["  (no test output)"]


def _ms(row: dict) -> str:
    if "median_ms" not in row:
        return row.get("skipped", "?")[:60]
    text = f"{row['median_ms']:.1f} ms"
    if row.get("overhead_pct") is not None:
        text += f" ({row['overhead_pct']:+.1f}%)"
    if row.get("bit_identical") is not None:
        text += ", exact" if row["bit_identical"] else ", NOT bit-identical"
    return text


def _verdict(target: dict) -> str:
    mark = {True: "met    ", False: "NOT MET", None: "n/a    "}[target["met"]]
    if target["value"] is None:
        return f"  {mark} {target['name']}: {target.get('why', '')}"
    return f"  {mark} {target['name']}: {target['value']:.4g} vs {target['limit']:.4g} {target['unit']}"


def bench(out: str) -> list[str]:
    try:
        with open(os.path.join(out, "bench.json")) as f:
            results = json.load(f)
    except (OSError, ValueError) as exc:
        return [f"  (no bench.json: {type(exc).__name__})"]
    shown = [f"  {results['machine'].get('gpu') or results['machine']['device']}, {results['dtype']}, "
             f"{results['shape']['layers']} blocks of dim {results['shape']['dim']}, "
             f"copy ceiling {results.get('copy_ceiling_GBps', 0):.1f} GB/s"
             + ("" if results.get("complete") else "; NOT COMPLETE")]
    for section in ("main", "short_clip"):
        rows = results.get(section, {}).get("modes", {})
        if rows:
            shown.append(f"  {section}: " + "; ".join(f"{name} {_ms(row)}" for name, row in rows.items()))
    judged = [t for t in results.get("targets", []) if not t.get("host")]
    shown += [_verdict(t) for t in judged if t["met"] is not None]
    reasons: dict[str, list[str]] = {}
    for t in judged:
        if t["met"] is None:
            reasons.setdefault(t.get("why", ""), []).append(t["name"].split(":")[0])
    shown += [f"  n/a     {len(names)} target(s): {why} ({', '.join(dict.fromkeys(names))})"
              for why, names in reasons.items()]
    return shown


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("state")
    p.add_argument("--elapsed", type=float, default=None, help="seconds the script has run so far")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    table = parts(args.state)
    total_limit = sum(int(row[1]) for row in table)
    lines = [f"gpu_check summary{' (DRY RUN: CPU only, no GPU part ran)' if args.dry_run else ''}: "
             f"{args.elapsed or 0:.0f} s, limits {total_limit} s", f"  {'part':<12} {'limit':>5} {'took':>5}  outcome"]
    lines += [f"  {name:<12} {limit:>5} {took:>5}  {note}" for name, limit, took, note in table]
    lines.append("probe")
    lines += probe(args.out)
    since_path = os.path.join(args.state, "build_start")
    since = float(open(since_path).read()) if os.path.exists(since_path) else None
    units = slowest_units("build", since) if since is not None else []
    lines.append("build: " + ("slowest units " + ", ".join(f"{u} {s:.0f} s" for u, s in units) if units
                              else "no compile units recorded by this run"))
    if any(row[0] == "build" and row[3] not in ("ok",) and not row[3].startswith("skipped") for row in table):
        errors = [line for line in _lines(os.path.join(args.out, "build.log")) if "error" in line.lower()]
        lines += [f"  {line.strip()}" for line in errors[:3]] or ["  (no line of build.log names an error)"]
    lines.append("correctness")
    lines += correctness(args.out)
    lines.append("tests")
    lines += tests(args.out)
    lines.append("bench")
    lines += bench(args.out)
    problems = []
    if total_limit > MAX_TOTAL_S:
        problems.append(f"the parts' limits add up to {total_limit} s, more than {MAX_TOTAL_S} s")
    text_path = os.path.join(args.out, "summary.txt")
    files = sorted(set(os.listdir(args.out)) | {"summary.txt"})
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files under {args.out}, more than the {MAX_FILES} a device call brings back: "
                        + ", ".join(files))
    lines += [f"PROBLEM: {problem}" for problem in problems]
    text = "\n".join(line if len(line) <= WIDTH else line[: WIDTH - 3] + "..." for line in lines)
    with open(text_path, "w") as f:
        f.write(text + "\n")
    print(text, flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
