"""The main job end to end on a tiny setting: it runs, prints the table, writes JSON and a PNG,
and this engine's output matches the resident model's. (No timing is asserted: speed goals live
in the benchmark itself.)"""

import json
import subprocess
import sys
from dataclasses import replace

import torch

from fastvideo_offload.bench.model import CPU_SMALL, build, weight_bytes


def test_bench_runs_and_writes_its_outputs(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    # 3 blocks: with 2, prefetch 1's two slots would keep both resident and a GPU copy nothing.
    proc = subprocess.run(
        [sys.executable, "-m", "fastvideo_offload", "bench", "--layers", "3", "--steps", "2", "--warmup", "1",
         "--frames", "1", "--height", "64", "--width", "64", "--modes", "resident,ours p1",
         "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per denoising step" in proc.stdout and "hook overhead" in proc.stdout
    results = json.loads(out_json.read_text())
    main = results["main"]["modes"]
    assert main["ours p1"]["bit_identical"] is True
    assert main["ours p1"]["engine"]["blocks"] == 3
    assert main["ours p1"]["timeline"]["compute"] and main["ours p1"]["timeline"]["copy"]
    assert results["wan22"]["idle_expert_device_bytes"] == 0
    assert results["hooks"]["modes"]["ours p1"]["us_per_block"] is not None
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_time_limit_skips_what_is_left_and_still_reports(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastvideo_offload", "bench", "--layers", "2", "--steps", "2", "--warmup", "1",
         "--frames", "1", "--height", "64", "--width", "64", "--time-limit", "0", "--json", str(out_json)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out_json.read_text())
    assert len(results["main"]["modes"]) == 6
    assert all(row == {"skipped": "time limit"} for row in results["main"]["modes"].values())
    assert results["wan22"] == {"failed": "not run: time limit"}
    assert "wan22: failed: not run: time limit" in proc.stdout
    assert [t["met"] for t in results["targets"]] == [None] * 7


def test_weight_bytes_match_the_built_model():
    shape = replace(CPU_SMALL, layers=3)
    model = build(shape, torch.bfloat16)
    counted = weight_bytes(shape, torch.bfloat16)
    block = sum(p.nbytes for p in model.blocks[0].parameters())
    everything = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    assert counted == {"model": everything, "block": block, "non_block": everything - 3 * block}
