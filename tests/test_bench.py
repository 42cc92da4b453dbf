"""The main job end to end on a tiny setting: it runs, prints the table, writes JSON and a PNG,
and this engine's output matches the resident model's. (No timing is asserted: speed goals live
in the benchmark itself.)"""

import json
import subprocess
import sys


def test_bench_runs_and_writes_its_outputs(tmp_path):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run(
        [sys.executable, "-m", "fastvideo_offload", "bench", "--layers", "2", "--steps", "2", "--warmup", "1",
         "--frames", "1", "--height", "64", "--width", "64", "--modes", "resident,ours p1",
         "--json", str(out_json), "--plot", str(out_png)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per denoising step" in proc.stdout and "hook overhead" in proc.stdout
    results = json.loads(out_json.read_text())
    main = results["main"]["modes"]
    assert main["ours p1"]["bit_identical"] is True
    assert main["ours p1"]["engine"]["blocks"] == 2
    assert main["ours p1"]["timeline"]["compute"] and main["ours p1"]["timeline"]["copy"]
    assert results["wan22"]["idle_expert_device_bytes"] == 0
    assert results["hooks"]["modes"]["ours p1"]["us_per_block"] is not None
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
