"""FastVideo's LTX-2 under `patch_fastvideo()`, whose blocks sit one level down
(model.transformer_blocks), where FastVideo's own offload and its LoRA bookkeeping look only at
top-level lists: its LTX2Pipeline with a LoRA adapter merges into the offloaded blocks, and its
loader offloads the DiT also when it loads it into host memory first. Bit-identical to FastVideo
without offload, on a tiny LTX-2 with random weights."""

import logging

import pytest
import torch
from safetensors.torch import save_file

import fastvideo_offload as fo
from support.needs import integration
from support.fastvideo_cpu import cpu_is_the_local_device, load, ltx2_pipeline, on_cpu, run_ltx2, save_ltx2
from fastvideo_offload.checkpoint import CheckpointWeights
from fastvideo_offload.integrations import fastvideo as integ

if torch.cuda.is_available():
    pytest.skip("FastVideo's CPU tests run on a machine without a GPU", allow_module_level=True)

integration("fastvideo")
BLOCKS = ["model.transformer_blocks.0", "model.transformer_blocks.1"]
FALLBACK = "FastVideo loads the DiT into host memory first"


@pytest.fixture(scope="module", autouse=True)
def fastvideo_cpu():
    on_cpu()


@pytest.fixture(autouse=True)
def patched(monkeypatch):
    cpu_is_the_local_device(monkeypatch)
    # FastVideo compiles every LoRA layer's forward; both sides of each comparison run it eagerly.
    with torch._dynamo.config.patch(disable=True):
        fo.patch_fastvideo()
        yield
        fo.unpatch_fastvideo()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ltx2")
    save_ltx2(path)
    return path


#: The linears the LoRA adapter below adapts, in both blocks (and FastVideo's lora_target_modules).
TARGETS = {"attn1.to_q": (16, 16), "audio_attn2.to_v": (16, 16), "ff.net.2": (16, 64)}


def adapter(path, low_rank=True, dense=False):
    """A random LoRA adapter for the tiny LTX-2, keyed as published (no `model.` prefix): low-rank
    factors for TARGETS, and, with `dense`, a whole-parameter delta (`.diff_b`)."""
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for block in (0, 1):
        for layer, (out_features, in_features) in TARGETS.items():
            key = f"transformer_blocks.{block}.{layer}"
            if low_rank:
                tensors[f"{key}.lora_A.weight"] = torch.randn(4, in_features, generator=g) * 0.1
                tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, 4, generator=g) * 0.1
                tensors[f"{key}.alpha"] = torch.tensor(8.0)
    if dense:
        tensors["transformer_blocks.1.attn1.to_k.diff_b"] = torch.randn(16, generator=g)
    save_file(tensors, path)
    return str(path)


def safe_open_tensor(path, key):
    from safetensors import safe_open

    with safe_open(str(path / "diffusion_pytorch_model.safetensors"), "pt") as f:
        return f.get_tensor(key).to(torch.bfloat16)


def placeholders(module):
    """Whether the block weights are offloaded (the LoRA factors a merge adds stay resident, as under
    FastVideo's own offload)."""
    return all(p.numel() == 0 for name, p in module.named_parameters() if ".lora_" not in name)


def assert_same(model, reference):
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    # On a CPU, FastVideo's LoRA layer registers its base weight a second time, as `cpu_weight` (the
    # `.to("cpu")` meant to copy it returns the parameter itself): a name made after enable, which the
    # offloaded state_dict does not know. On CUDA it is a plain host copy and no entry at all.
    state = {k: v for k, v in state.items() if not k.endswith(".cpu_weight")}
    assert all(torch.equal(v, expected[k]) and v.dtype == expected[k].dtype for k, v in state.items())
    for step in range(2):
        got, want = run_ltx2(model, step), run_ltx2(reference, step)
        assert len(got) == len(want) == 2 and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("dense", [False, True], ids=["low-rank", "with-whole-parameter-deltas"])
def test_lora_merges_into_ltx2s_nested_blocks(saved, tmp_path, dense):
    """LTX2Pipeline(..., lora_path=...) with FastVideo's default dit_layerwise_offload: FastVideo's
    conversion, merge and unmerge reach every offloaded block (before the fix: `The size of tensor a
    (0) must match the size of tensor b (16)`, merged into placeholders). An adapter with
    whole-parameter deltas also makes the loader load into host memory first."""
    lora = dict(lora_path=adapter(tmp_path / "lora.safetensors", dense=dense), lora_target_modules=list(TARGETS))
    reference = ltx2_pipeline(tmp_path / "reference", saved, offload=False, **lora)
    pipe = ltx2_pipeline(tmp_path / "offloaded", saved, offload=True, **lora)
    dit, expected = pipe.get_module("transformer"), reference.get_module("transformer")
    handle = fo.handle_of(dit)
    assert fo.handle_of(expected) is None
    assert handle.block_paths == ["model.transformer_blocks"]
    assert isinstance(handle._source, CheckpointWeights) != dense
    # every converted layer is filed under the offloaded block that holds it
    layers = pipe.lora_layers["transformer"]
    assert sorted(layers.block_to_lora_layers) == BLOCKS and not layers.other_lora_layers
    assert layers.lora_layers_to_block.keys() == reference.lora_layers["transformer"].lora_layers_to_block.keys()
    assert all(name.startswith(block + ".") for name, block in layers.lora_layers_to_block.items())
    merged = [name for name, layer in layers.all_lora_layers() if layer.merged]
    assert len(merged) == 6
    key = "model.transformer_blocks.1.ff.net.2.base_layer.weight"
    assert not torch.equal(dit.state_dict()[key], safe_open_tensor(saved, key.replace(".base_layer", "")))
    assert placeholders(dit.model.transformer_blocks)
    assert_same(dit, expected)
    for change in ("unmerge_lora_weights", "merge_lora_weights"):
        getattr(pipe, change)()
        getattr(reference, change)()
        assert placeholders(dit.model.transformer_blocks)
        assert_same(dit, expected)
    handle.disable()
    assert_same(dit, expected)


def test_ltx2_loaded_into_host_memory_first_is_offloaded(saved, tmp_path, caplog):
    """A whole-parameter adapter makes FastVideo load LTX-2 into host memory first; FastVideo's loader
    then skips its offload (no top-level ModuleList). The patch offloads it anyway."""
    lora = adapter(tmp_path / "dense.safetensors", low_rank=False, dense=True)
    from fastvideo.pipelines.basic.ltx2.pipeline_configs import LTX2T2VConfig

    with caplog.at_level(logging.INFO):
        model = load(saved, offload=True, pipeline_config=LTX2T2VConfig(), lora_path=lora)
    assert FALLBACK in caplog.text and "whole-parameter LoRA" in caplog.text
    handle = fo.handle_of(model)
    assert handle is not None and handle.block_paths == ["model.transformer_blocks"]
    assert not isinstance(handle._source, CheckpointWeights) and placeholders(model.model.transformer_blocks)
    reference = load(saved, offload=False, pipeline_config=LTX2T2VConfig(), lora_path=lora)
    assert not torch.equal(reference.state_dict()["model.transformer_blocks.1.attn1.to_k.bias"],
                           load(saved, offload=False, pipeline_config=LTX2T2VConfig())
                           .state_dict()["model.transformer_blocks.1.attn1.to_k.bias"])  # the delta applied
    assert_same(model, reference)


def test_a_dit_the_engine_refuses_goes_whole_to_the_device(saved, tmp_path, monkeypatch, caplog):
    """Where the DiT cannot be offloaded it ends where FastVideo leaves a DiT it does not offload: on
    the device, not in host memory. A device the engine refuses (meta) stands for any refusal."""
    lora = adapter(tmp_path / "dense.safetensors", low_rank=False, dense=True)
    from fastvideo.pipelines.basic.ltx2.pipeline_configs import LTX2T2VConfig

    monkeypatch.setattr(integ, "_device", lambda: torch.device("meta"))
    with caplog.at_level(logging.WARNING):
        model = load(saved, offload=True, pipeline_config=LTX2T2VConfig(), lora_path=lora)
    assert fo.handle_of(model) is None
    assert "LTX2Transformer3DModel is not offloaded and goes whole to meta" in caplog.text
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
