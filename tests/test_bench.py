"""The main job end to end on a tiny setting: it runs, prints the table, writes JSON, the table
and a PNG, and this engine's output matches the resident model's. (No timing is asserted: speed
goals live in the benchmark itself.)"""

import importlib
import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

import fastvideo_offload as fo
from support.needs import integration
from fastvideo_offload.bench import modes, overlap, report, run
from fastvideo_offload.bench.model import CPU_SMALL, build, weight_bytes
from fastvideo_offload.planner import plan, spread

# The benchmark runs every mode on the device it is given; the engine's ordering is proven on the
# asynchronous device by the tests that move its bytes.
pytestmark = pytest.mark.sync_pass_only

TINY = ["--layers", "3", "--steps", "2", "--warmup", "1", "--frames", "1", "--height", "64", "--width", "64"]
#: The sections that run in this process; load and node start processes and are tested apart.
IN_PROCESS = ["--sections", "main,short_clip,wan22,hooks,pack_GBps"]


def test_bench_runs_and_writes_its_outputs(tmp_path):
    out = tmp_path / "out"  # not there yet: the bench makes it
    out_json, out_table, out_png = out / "bench.json", out / "bench.txt", out / "bench.png"
    # 3 blocks: with 2, prefetch 1's two slots would keep both resident and a GPU copy nothing.
    proc = subprocess.run(
        [sys.executable, "-m", "fastvideo_offload", "bench", *TINY, *IN_PROCESS,
         "--modes", "resident,ours p1,ours p1 async",
         "--json", str(out_json), "--table", str(out_table), "--plot", str(out_png)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per denoising step" in proc.stdout and "hook overhead" in proc.stdout
    results = json.loads(out_json.read_text())
    assert results["complete"] is True
    main = results["main"]["modes"]
    assert main["ours p1"]["bit_identical"] is True
    # The resident reference runs again after ours; overhead is against the mean of both runs.
    assert main["resident after ours"]["bit_identical"] is True
    resident = results["main"]["resident"]
    assert list(resident["runs_ms"]) == ["resident", "resident after ours"]
    assert resident["spread_pct"] >= 0 and resident["reference"] == "mean of 2 resident runs"
    expected = (main["ours p1"]["median_ms"] / resident["reference_ms"] - 1) * 100
    assert main["ours p1"]["overhead_pct"] == pytest.approx(expected)
    if torch.cuda.is_available():
        assert "copy engine" in main["ours p1 async"]["skipped"]
    else:
        assert main["ours p1 async"]["bit_identical"] is True
        assert main["ours p1 async"]["engine"]["blocks"] == 3
        assert results["hooks"]["modes"]["ours p1 async"]["us_per_block"] is not None
        assert "copy nothing" in proc.stdout  # what a CPU run cannot show
    assert out_table.read_text().strip() == proc.stdout.split("\nwrote ")[0].strip()
    assert main["ours p1"]["engine"]["blocks"] == 3
    assert main["ours p1"]["timeline"]["compute"] and main["ours p1"]["timeline"]["copy"]
    assert results["wan22"]["idle_expert_device_bytes"] == 0
    assert results["hooks"]["modes"]["ours p1"]["us_per_block"] is not None
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_time_limit_skips_what_is_left_and_still_reports(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastvideo_offload", "bench", *TINY, "--time-limit", "0", "--json", str(out_json)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out_json.read_text())
    rows = results["main"]["modes"]
    assert set(rows) == {m.name for m in modes.all_modes()} | {"resident after ours", "resident after peers"}
    assert all(row == {"skipped": "time limit"} for row in rows.values())
    assert results["wan22"] == {"failed": "not run: time limit"}
    assert "wan22: failed: not run: time limit" in proc.stdout
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert [t["met"] for t in results["targets"]] == [None] * (10 + 3 + len(modes.budget_modes(device)) + 1)
    assert results["load"] == results["node"] == {"failed": "not run: time limit"}


def test_weight_bytes_match_the_built_model():
    shape = replace(CPU_SMALL, layers=3)
    model = build(shape, torch.bfloat16)
    counted = weight_bytes(shape, torch.bfloat16)
    block = sum(p.nbytes for p in model.blocks[0].parameters())
    everything = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    assert counted == {"model": everything, "block": block, "non_block": everything - 3 * block}


def test_a_run_cut_off_keeps_its_table_and_verdicts(tmp_path, monkeypatch):
    """A run killed after the short clip (as `timeout` would) has already written the table and
    the targets' verdicts on what it measured."""
    bench_run = importlib.import_module("fastvideo_offload.bench.run")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # not an Exception: the section cannot catch it, like a kill

    monkeypatch.setattr(bench_run, "wan22", killed)
    out_json, out_table = tmp_path / "bench.json", tmp_path / "bench.txt"
    with pytest.raises(KeyboardInterrupt):
        bench_run.main([*TINY, "--modes", "resident,ours p1", "--json", str(out_json), "--table", str(out_table)])
    results = json.loads(out_json.read_text())
    assert results["complete"] is False
    assert "resident after ours" in results["short_clip"]["modes"] and "wan22" not in results
    assert len(results["targets"]) == 10 + 3 + len(modes.budget_modes(torch.device("cpu"))) + 1
    text = out_table.read_text()
    assert "short clip" in text and "resident after ours" in text
    assert "targets (set for an H100" in text and "wan22: not run yet" in text
    assert "run not finished" in text


def test_the_async_mode_sets_its_environment_only_around_enable(monkeypatch):
    seen = {}
    monkeypatch.setenv("FASTVIDEO_OFFLOAD_CPU_TRANSFER", "sync")
    monkeypatch.delenv("FASTVIDEO_OFFLOAD_ASYNC_DELAY_US", raising=False)
    monkeypatch.setattr(modes.api, "enable", lambda model, **kw: seen.update(
        {k: os.environ.get(k) for k in modes.ASYNC_CPU_ENV}))
    mode = {m.name: m for m in modes.all_modes()}["ours p1 async"]
    mode.prepare(torch.nn.Linear(2, 2), torch.device("cpu"))
    assert seen == {"FASTVIDEO_OFFLOAD_CPU_TRANSFER": "async", "FASTVIDEO_OFFLOAD_ASYNC_DELAY_US": "0"}
    assert os.environ["FASTVIDEO_OFFLOAD_CPU_TRANSFER"] == "sync"
    assert "FASTVIDEO_OFFLOAD_ASYNC_DELAY_US" not in os.environ
    assert mode.unavailable(torch.device("cpu")) is None
    assert mode.unavailable(torch.device("cuda")) is not None


def test_the_share_budgets_are_the_planners_tightest():
    """Each CPU budget row's budget is the least under which the planner keeps its blocks: a byte
    less keeps fewer. With 8 blocks and 2 slots, 6 resident would cost what 8 do, so 75% keeps 5."""
    model = build(replace(CPU_SMALL, dim=64, heads=1, ffn=64, layers=8), torch.float32)
    sizes = modes.block_sizes(model)
    staying = sum(t.nbytes for t in (*model.parameters(), *model.buffers())) - sum(sizes)
    kept = []
    for share in modes.CPU_BUDGET_SHARES:
        blocks = modes.share_budget(model, share, 2) - staying
        chosen = plan(sizes, blocks, 2)
        assert chosen.device_bytes == blocks
        assert len(plan(sizes, blocks - 1, 2).resident) < len(chosen.resident)
        assert chosen.streamed == tuple(spread(8, len(chosen.streamed)))
        kept.append(len(chosen.resident))
    assert kept == [2, 4, 5]


def test_budget_rows_copy_exactly_their_streamed_blocks(tmp_path, monkeypatch):
    bench_run = importlib.import_module("fastvideo_offload.bench.run")
    narrow = replace(CPU_SMALL, dim=64, heads=1, ffn=64, text_dim=64)  # 8 blocks in a few seconds
    monkeypatch.setattr(bench_run, "CPU_SMALL", narrow)
    budgets = [f"ours budget {s:.0%}" for s in modes.CPU_BUDGET_SHARES]
    modes_arg = ",".join(["resident", "ours p1", *budgets])
    args = [*TINY, *IN_PROCESS, "--layers", "8", "--device", "cpu", "--modes", modes_arg]
    results = bench_run.main([*args, "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png")])
    sizes = modes.block_sizes(build(replace(narrow, layers=8), torch.float32))
    for section in ("main", "short_clip"):
        rows = results[section]["modes"]
        assert rows["ours p1"]["layout"]["streamed"] == list(range(8))
        kept = []
        for name in budgets:
            row, layout = rows[name], rows[name]["layout"]
            assert row["bit_identical"] is True
            assert layout["copied_per_step"] == layout["streamed_bytes"] == row["h2d_bytes_per_step"]
            assert layout["streamed_bytes"] == sum(sizes[i] for i in layout["streamed"])
            assert row["engine"]["resident_blocks"] == len(layout["resident"])
            assert sorted(layout["resident"] + layout["streamed"]) == list(range(8))
            expected = (row["median_ms"] / rows["ours p1"]["median_ms"] - 1) * 100
            assert row["vs_stream_all_pct"] == pytest.approx(expected)
            kept.append(len(layout["resident"]))
        assert kept == [2, 4, 5]
    checks = [t for t in results["targets"] if t.get("check")]
    assert [t["met"] for t in checks] == [True] * 3 + [None]  # the training section did not run
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = report.table(results)
    assert "device budget" in table and "checks (any machine)" in table


def test_the_training_section_copies_each_streamed_block_both_ways_and_its_grads_are_exact(tmp_path):
    bench_run = importlib.import_module("fastvideo_offload.bench.run")
    results = bench_run.main([*TINY, "--layers", "4", "--device", "cpu", "--sections", "training",
                              "--json", str(tmp_path / "b.json")])
    row = results["training"]
    streamed, ring = 4, 2  # prefetch 1
    block = modes.block_sizes(build(replace(CPU_SMALL, layers=4), torch.float32))[0]
    assert row["grads_exact"] is True and row["grads_max_abs_diff"] == 0.0
    assert row["h2d_bytes_per_step"] == row["expected_h2d_bytes_per_step"] == 2 * (streamed - ring) * block
    assert row["backward_uploads_per_step"] == streamed - ring
    assert row["lora_params"] > 0 and row["offloaded_ms"] > 0 and row["resident_ms"] > 0
    check = next(t for t in results["targets"] if t["name"].startswith("training: bytes copied"))
    assert check["met"] is True
    assert "training, LoRA steps" in report.table(results) and "bit-identical to resident" in report.table(results)


def test_the_staged_row_has_a_staging_timeline(tmp_path, monkeypatch):
    """The staged row's step: staging pieces (its staged blocks only), copy and compute, and the
    share of the staging time that overlapped compute, in the JSON, the table and the plot."""
    bench_run = importlib.import_module("fastvideo_offload.bench.run")
    monkeypatch.setattr(bench_run, "CPU_SMALL", replace(CPU_SMALL, dim=64, heads=1, ffn=64, text_dim=64))
    layers = modes.PINNED_BLOCKS + 3
    results = bench_run.main([*TINY, "--layers", str(layers), "--device", "cpu", "--sections", "main",
                              "--modes", f"resident,{modes.STREAM_ALL},{modes.STAGED}",
                              "--plot", str(tmp_path / "b.png")])
    rows = results["main"]["modes"]
    staged = rows[modes.STAGED]
    assert staged["bit_identical"] is True
    timeline = staged["timeline"]
    assert set(timeline) == {"staging", "copy", "compute"} and timeline["copy"] and timeline["compute"]
    assert timeline["staging"]
    assert {block for *_, block in timeline["staging"]} <= set(range(modes.PINNED_BLOCKS, layers))
    assert {thread for _, _, thread, _ in timeline["staging"]} <= set(range(staged["engine"]["staging_threads"]))
    assert all(length >= 0 for _, length, *_ in timeline["staging"])
    assert 0 <= staged["staging_overlap"] <= 1
    assert rows[modes.STREAM_ALL]["timeline"]["staging"] == [] and "staging_overlap" not in rows[modes.STREAM_ALL]
    assert f"{modes.STAGED}: staging overlapped compute" in report.table(results)
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_staging_overlap_counts_each_moment_once():
    # Staging busy 0-15 ms (two threads, overlapping); compute 2-6 and 12-22: 4 + 3 of 15 ms.
    lanes = {"staging": [[0, 10, 0, 3], [5, 10, 1, 4]], "copy": [], "compute": [[2, 4], [12, 10]]}
    assert overlap.staging_overlap(lanes) == pytest.approx(7 / 15)
    assert overlap.staging_overlap({**lanes, "staging": []}) is None



def test_staging_pieces_group_into_fills():
    # Block 3's pieces back to back, then its fill of the next step; block 4's between.
    pieces = [[0, 1, 0, 3], [1, 1, 0, 3], [2, 1, 0, 4], [100, 1, 0, 3]]
    assert sorted(overlap.fills(pieces)) == [[[0, 1, 0, 3], [1, 1, 0, 3]], [[2, 1, 0, 4]], [[100, 1, 0, 3]]]


def test_load_and_node_sections_are_consistent(tmp_path, monkeypatch):
    """Each way loads the same checkpoint in a process of its own; each rank count runs real ranks.
    Numbers are checked for consistency, not speed: sharing holds less than a store per rank."""
    bench_run = importlib.import_module("fastvideo_offload.bench.run")
    node = importlib.import_module("fastvideo_offload.bench.node")
    monkeypatch.setattr(node, "SHAPE", replace(CPU_SMALL, layers=2))  # a 29 MB store
    results = bench_run.main([*TINY, "--layers", "2", "--device", "cpu", "--sections", "load,node",
                              "--node-ranks", "1,2", "--json", str(tmp_path / "b.json"),
                              "--plot", str(tmp_path / "b.png")])
    assert "main" not in results and results["complete"] is True
    load = results["load"]
    ways = load["ways"]
    assert load["files"] > 1
    assert load["store_bytes"] >= load["checkpoint_bytes"] - load["non_block_bytes"]  # the store aligns, adds
    assert ways["ours"]["host_bytes"] == load["store_bytes"] and ways["ours"]["max_abs_diff"] == 0
    assert ways["diffusers"]["max_abs_diff"] < 1e-4
    for row in (ways["ours"], ways["diffusers"]):
        assert row["x_store"] == pytest.approx((row["peak_rss_bytes"] - load["non_block_bytes"]) / load["store_bytes"])
    assert load["diffusers_vs_ours"] == pytest.approx(ways["diffusers"]["seconds"] / ways["ours"]["seconds"])
    assert "unavailable" in ways["fastvideo"]
    node_section = results["node"]
    store = node_section["store_bytes"]
    assert list(node_section["ranks"]) == ["1", "2"]
    for n, row in node_section["ranks"].items():
        for key in ("shared", "checkpoint", "unshared"):
            cell = row[key]
            assert len(cell["per_rank"]) == int(n) and cell["x_store"] == cell["node_bytes"] / store
            for r in cell["per_rank"]:
                assert r["host_bytes"] == r["pss_growth_bytes"] - r["device_bytes"] - r["non_block_bytes"]
    two = node_section["ranks"]["2"]
    assert two["shared"]["node_bytes"] < 0.75 * two["unshared"]["node_bytes"]
    assert two["checkpoint"]["node_bytes"] < 0.75 * two["unshared"]["node_bytes"]
    host = [t for t in results["targets"] if t.get("host")]
    assert [t["met"] is not None for t in host] == [True] * 3
    table = report.table(results)
    for heading in ("load, checkpoint on disk", "host targets (any machine)", "shared, from ckpt MB"):
        assert heading in table


def test_help_lists_every_mode(capsys):
    with pytest.raises(SystemExit) as exit_:
        run.parse_args(["--help"])
    assert exit_.value.code == 0
    assert "ours budget 25%" in capsys.readouterr().out


NARROW = replace(CPU_SMALL, dim=64, heads=1, ffn=64, text_dim=64)


def test_each_scenario_builds_its_model_once_and_every_row_stays_exact(monkeypatch):
    """A scenario's model is built once: this engine's modes take it and give it back to host
    memory, the others (the resident reference, accelerate's offload) run on a view of it. Every
    row's output matches the resident one's, which a model given back changed would not, and no row
    counts the reused model's memory as retained by offloading."""
    integration("accelerate")
    bench_run = importlib.import_module("fastvideo_offload.bench.run")
    built = []
    real_build = bench_run.build
    monkeypatch.setattr(bench_run, "build", lambda *args, **kwargs: built.append(args) or real_build(*args, **kwargs))
    monkeypatch.setattr(bench_run, "CPU_SMALL", NARROW)
    ours = ["ours p1", "ours p2", "ours budget 50%", modes.STAGED]  # in all_modes() order
    results = bench_run.main([*TINY, "--layers", "5", "--device", "cpu", "--sections", "main,short_clip",
                              "--modes", ",".join(["resident", *ours, "accelerate"])])
    scenarios = [args for args in built if args[0] == replace(NARROW, layers=5)]  # not the packing section's block
    assert len(scenarios) == 3  # main's pass of ours, its pass of the peers, the short clip
    for section, names in (("main", ["resident", *ours, "resident after ours", "accelerate", "resident after peers"]),
                           ("short_clip", ["resident", *ours, "resident after ours"])):
        rows = results[section]["modes"]
        assert list(rows) == names
        assert all(rows[name]["bit_identical"] is True for name in names), {n: rows[n].get("skipped") for n in names}
        assert all(rows[name]["engine"]["retained_bytes"] == 0 for name in ours)
    assert results["main"]["modes"][modes.STAGED]["engine"]["staged_blocks"] == 2


def test_a_view_is_moved_and_hooked_without_touching_the_model():
    accelerate = integration("accelerate")
    model = build(replace(NARROW, layers=2), torch.float32)
    before = {name: (t.clone(), t.data_ptr()) for name, t in model.state_dict().items()}
    view = modes.view(model)
    pairs = list(zip(view.parameters(), model.parameters())) + list(zip(view.buffers(), model.buffers()))
    assert all(a is not b and a.data_ptr() == b.data_ptr() for a, b in pairs)  # no byte copied
    view.to(torch.float64)  # swaps each parameter's data, as a resident mode's .to(device) does
    accelerate.cpu_offload(view, execution_device=torch.device("cpu"))  # parameters to meta, hooks
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in model.state_dict().values())
    assert all(torch.equal(t, before[n][0]) and t.data_ptr() == before[n][1] for n, t in model.state_dict().items())
    assert not hasattr(model, "_hf_hook") and all(not hasattr(m, "_hf_hook") for m in model.modules())


@pytest.mark.parametrize("name", [modes.STREAM_ALL, modes.STAGED, "ours budget 50%"])
def test_this_engines_modes_give_the_model_back_as_it_was(name):
    mode = {m.name: m for m in modes.all_modes()}[name]
    model = build(replace(NARROW, layers=5), torch.float32)
    before = {n: (t.clone(), t.stride()) for n, t in model.state_dict().items()}
    x = torch.randn(1, 4, NARROW.in_channels * 4), torch.full((1,), 500.0), torch.randn(1, NARROW.text_len, 64)
    with torch.inference_mode():
        expected = model(*x)
        for _ in range(2):  # given back, the model can be taken again
            mode.prepare(model, torch.device("cpu"))
            assert torch.equal(model(*x), expected)
            mode.release(model)
            assert fo.handle_of(model) is None
            after = model.state_dict()
            assert list(after) == list(before)
            assert all(torch.equal(t, before[n][0]) and t.stride() == before[n][1] for n, t in after.items())
