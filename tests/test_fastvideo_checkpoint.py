"""FastVideo's own TransformerLoader under `patch_fastvideo()`: a Wan DiT checkpoint in the
diffusers format it reads (config, several shards, index) goes straight into the host store,
bit-identical to FastVideo's loader without the patch followed by `enable`, with a lower peak of
host memory; what that path cannot follow falls back to loading first, and says why."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import fastvideo_offload as fo
from support.needs import integration
from support.fastvideo_cpu import load, on_cpu, run, save_wan
from fastvideo_offload.checkpoint import CheckpointWeights

if torch.cuda.is_available():
    pytest.skip("FastVideo's CPU tests run on a machine without a GPU", allow_module_level=True)

integration("fastvideo")
integration("diffusers")
#: The subprocess imports the package this test imports (a worktree's, not an installed one), and
#: the tests' support package.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(fo.__file__))
TESTS = os.path.dirname(os.path.abspath(__file__))
FALLBACK = "FastVideo loads the DiT into host memory first"


@pytest.fixture(scope="module", autouse=True)
def fastvideo_cpu():
    on_cpu()


@pytest.fixture(autouse=True)
def unpatched_after():
    yield
    fo.unpatch_fastvideo()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("wan")
    save_wan(path)
    return path


def unpatched_then_enable(path):
    fo.unpatch_fastvideo()
    model = load(path, offload=False)
    fo.enable(model, device="cpu")
    return model


def assert_same(model, reference):
    dtypes = {k: v.dtype for k, v in reference.state_dict().items()}
    assert {k: v.dtype for k, v in model.state_dict().items()} == dtypes
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    for step in range(2):  # FastVideo's Wan loads in bf16
        assert torch.equal(run(model, step, dtype=torch.bfloat16), run(reference, step, dtype=torch.bfloat16))


def test_the_checkpoint_goes_straight_into_the_host_store(saved, caplog):
    assert len(list(saved.glob("*.safetensors"))) > 3 and list(saved.glob("*.index.json"))
    fo.patch_fastvideo()
    with caplog.at_level(logging.INFO):
        model = load(saved, offload=True)
    handle = fo.handle_of(model)
    assert isinstance(handle._source, CheckpointWeights) and FALLBACK not in caplog.text
    assert handle.stats()["blocks"] == 3 and not any(p.requires_grad for p in model.parameters())
    # FastVideo's renames (patch_embedding -> patch_embedding.proj, ...), kept for its LoRA code
    assert model.reverse_param_names_mapping["patch_embedding.proj.weight"][0] == "patch_embedding.weight"
    assert_same(model, unpatched_then_enable(saved))


def test_a_checkpoint_the_path_cannot_follow_falls_back_and_says_why(saved, tmp_path, caplog):
    """FastVideo skips `_extra_state` entries; the checkpoint path refuses any key the model lacks,
    so the patch lets FastVideo load into host memory first, as before."""
    for f in saved.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    save_file({"blocks.0.attn1._extra_state": torch.zeros(1)}, tmp_path / "extra.safetensors")
    fo.patch_fastvideo()
    with caplog.at_level(logging.INFO):
        model = load(tmp_path, offload=True)
    assert FALLBACK in caplog.text and "blocks.0.attn1._extra_state" in caplog.text
    assert fo.handle_of(model) is not None and not isinstance(fo.handle_of(model)._source, CheckpointWeights)
    assert_same(model, unpatched_then_enable(saved))


RSS_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    import fastvideo_offload as fo
    from support.fastvideo_cpu import load, on_cpu

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    on_cpu()
    patched = sys.argv[2] == "patched"
    if patched:
        fo.patch_fastvideo()
    for path in sys.argv[3], sys.argv[1]:  # the first, tiny, load imports what loading imports
        before = kib("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        start = time.perf_counter()
        model = load(path, offload=patched)
        if not patched:
            fo.enable(model, device="cpu")
        seconds = time.perf_counter() - start
    resident = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps(dict(before=before, peak=kib("VmHWM:"), host=fo.handle_of(model).stats()["host_bytes"],
                          resident=resident, seconds=seconds)))
""")


@pytest.mark.sync_pass_only
def test_peak_host_memory_while_loading_is_below_the_unpatched_loaders(tmp_path):
    """~100 MB of bf16 blocks from an fp32 checkpoint, each way in a fresh process, measured by the
    OS (VmHWM): FastVideo's loader holds the loaded model while `enable` packs it; the patch reads
    the blocks into the store and adds at most 5% (cast scratch, thread stacks) + the resident
    weights (host memory on a CPU device) + 8 MiB of Python objects."""
    save_wan(tmp_path / "tiny")
    save_wan(tmp_path / "wan", max_shard_size="50MB", num_attention_heads=8, attention_head_dim=64, ffn_dim=2048,
             num_layers=12)
    # A port of its own: this process's FastVideo holds the one in the environment. Freed scratch goes
    # back to the OS at once, so the peak shows what is live.
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    env |= {"PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, TESTS]), "MALLOC_MMAP_THRESHOLD_": "131072"}
    measured = {}
    for way in ("patched", "unpatched"):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "wan"), way, str(tmp_path / "tiny")],
                             env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        measured[way] = json.loads(out.stdout.strip().splitlines()[-1])
    print(measured)
    patched, unpatched = (measured[w]["peak"] - measured[w]["before"] for w in ("patched", "unpatched"))
    host, resident = measured["patched"]["host"], measured["patched"]["resident"]
    assert host > 90e6 and measured["unpatched"]["host"] == host
    assert patched <= 1.05 * host + resident + 8 * 2**20 < unpatched, measured
