"""FastVideo's own DiT classes, loader and LoRA hook point, patched by `patch_fastvideo()`:
tiny configs, random weights, CPU (FastVideo's torch SDPA backend, its distributed set-up at
world size 1 on gloo, its forward context)."""

import copy

import pytest
import torch

import fastvideo_offload as fo
from support.needs import integration
from fastvideo_offload.integrations import fastvideo as integ
from support.fastvideo_cpu import _init, cpu_is_the_local_device, dit_lora_pipeline, on_cpu, run, tiny_wan

if torch.cuda.is_available():
    # FastVideo picks its platform through NVML (CUDA_VISIBLE_DEVICES does not hide a GPU from
    # it) and then starts NCCL and offloads to cuda:0: these CPU tests need a machine without one.
    pytest.skip("FastVideo's CPU tests run on a machine without a GPU", allow_module_level=True)

fastvideo = integration("fastvideo")


@pytest.fixture(scope="module", autouse=True)
def fastvideo_cpu():
    on_cpu()
    yield


@pytest.fixture
def patched():
    fo.patch_fastvideo()
    yield
    fo.unpatch_fastvideo()



def tiny_hunyuan():
    from fastvideo.configs.models.dits.hunyuanvideo import HunyuanVideoArchConfig, HunyuanVideoConfig
    from fastvideo.models.dits.hunyuanvideo import HunyuanVideoTransformer3DModel

    arch = HunyuanVideoArchConfig(patch_size=2, patch_size_t=1, in_channels=16, out_channels=16,
                                  num_attention_heads=4, attention_head_dim=16, mlp_ratio=2.0, num_layers=2,
                                  num_single_layers=3, num_refiner_layers=1, rope_axes_dim=(4, 6, 6),
                                  guidance_embeds=False, text_embed_dim=64, pooled_projection_dim=32)
    return _init(HunyuanVideoTransformer3DModel(config=HunyuanVideoConfig(arch_config=arch), hf_config={}), 0)


def offload_like_the_loader(model):
    """What FastVideo's TransformerLoader.load calls once the DiT is built."""
    from fastvideo.models.loader import component_loader

    component_loader.enable_layerwise_offload(model)
    return fo.handle_of(model)


def placeholders(module):
    return all(p.numel() == 0 for p in module.parameters())


def test_wan_bit_identical_with_the_patch(patched):
    model = tiny_wan()
    reference = copy.deepcopy(model)
    handle = offload_like_the_loader(model)
    assert handle is not None and handle.block_paths == ["blocks"]
    for step in range(3):
        assert torch.equal(run(model, step), run(reference, step))
    assert placeholders(model.blocks)
    assert handle.stats()["enters"] == 9


def test_hunyuan_offloads_every_block_list(patched):
    model = tiny_hunyuan()
    reference = copy.deepcopy(model)
    handle = offload_like_the_loader(model)
    # FastVideo's own offload stops at double_blocks; ours takes all three lists
    assert handle.block_paths == ["txt_in.refiner_blocks", "double_blocks", "single_blocks"]
    for step in range(2):
        assert torch.equal(run(model, step, hunyuan=True), run(reference, step, hunyuan=True))
    assert placeholders(model.double_blocks) and placeholders(model.single_blocks)
    assert handle.stats()["enters"] == 2 * (1 + 2 + 3)


def test_wan22_expert_switch(patched):
    high, low = tiny_wan(seed=1), tiny_wan(seed=2)
    reference = {id(high): copy.deepcopy(high), id(low): copy.deepcopy(low)}
    handles = [offload_like_the_loader(high), offload_like_the_loader(low)]
    for step in range(6):  # a denoising loop that switches experts half-way, as denoising.py does
        expert = high if step < 3 else low
        assert torch.equal(run(expert, step), run(reference[id(expert)], step))
        if step == 3:
            # right after the switch: the idle expert holds no block on the device, and the
            # switch waited for one block's copy only
            assert handles[0].stats()["device_bytes"] == 0 and placeholders(high.blocks)
            assert handles[1].stats()["sync_loads"] == 1
    # what denoising.py calls after the loop
    for model in (high, low):
        manager = model._layerwise_offload_manager
        assert manager.enabled
        manager.release_all()
    assert handles[1].stats()["device_bytes"] == 0


def test_lora_merge_through_fastvideos_hook_point(patched):
    from fastvideo.pipelines import lora_pipeline

    model = tiny_wan()
    reference = copy.deepcopy(model)
    handle = offload_like_the_loader(model)
    run(model)  # the device slots now hold the old weights
    block = model.blocks[1]
    name = next(n for n, p in reference.blocks[1].named_parameters() if p.dim() == 2)
    delta = torch.randn(reference.blocks[1].get_parameter(name).shape) * 0.1
    with torch.no_grad():
        reference.blocks[1].get_parameter(name).add_(delta)
    with lora_pipeline._get_hook_ctx(block):  # what set_lora_adapter / merge_lora_weights use
        assert block.get_parameter(name).numel() == delta.numel()
        with torch.no_grad():
            block.get_parameter(name).add_(delta)
    assert placeholders(block)
    assert torch.equal(run(model, 1), run(reference, 1))
    assert torch.equal(model.state_dict()[f"blocks.1.{name}"], reference.state_dict()[f"blocks.1.{name}"])
    handle.disable()
    assert torch.equal(block.get_parameter(name), reference.blocks[1].get_parameter(name))
    # modules that are not offloaded blocks still get FastVideo's own (null) context
    with lora_pipeline._get_hook_ctx(model.patch_embedding):
        pass


def test_loader_puts_the_dit_in_host_memory(patched, tmp_path):
    """FastVideo's real TransformerLoader, on a diffusers-format checkpoint: the weights load
    into host memory and straight into the host store (on a CPU-only machine FastVideo would
    otherwise load onto its 'mps' device and fail)."""
    diffusers = integration("diffusers")
    from fastvideo.configs.pipelines.wan import WanT2V480PConfig
    from fastvideo.fastvideo_args import FastVideoArgs
    from fastvideo.models.loader.component_loader import TransformerLoader

    diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=64, ffn_dim=128, num_layers=2, rope_max_seq_len=64,
    ).save_pretrained(tmp_path)
    args = FastVideoArgs(model_path=str(tmp_path), pipeline_config=WanT2V480PConfig(), inference_mode=True,
                         dit_layerwise_offload=True, hsdp_shard_dim=1, hsdp_replicate_dim=1)
    model = TransformerLoader().load(str(tmp_path), args)
    handle = fo.handle_of(model)
    assert handle is not None and handle.stats()["blocks"] == 2 and placeholders(model.blocks)
    offloaded = run(model, dtype=torch.bfloat16)  # FastVideo's Wan loads in bf16
    handle.disable()
    assert torch.equal(offloaded, run(model, dtype=torch.bfloat16))


def test_patch_is_idempotent_and_undone():
    from fastvideo.hooks import layerwise_offload
    from fastvideo.models.loader import component_loader

    original = component_loader.enable_layerwise_offload
    fo.patch_fastvideo()
    fo.patch_fastvideo()
    assert component_loader.enable_layerwise_offload is integ.enable_layerwise_offload
    assert layerwise_offload.enable_layerwise_offload is integ.enable_layerwise_offload
    fo.unpatch_fastvideo()
    fo.unpatch_fastvideo()
    assert component_loader.enable_layerwise_offload is original
    assert not integ.is_patched()


def test_missing_symbol_names_the_version(monkeypatch):
    from fastvideo.pipelines import lora_pipeline

    monkeypatch.delattr(lora_pipeline, "_get_hook_ctx")
    missing = r"FastVideo 0\.2\.1 has no fastvideo\.pipelines\.lora_pipeline\._get_hook_ctx"
    with pytest.raises(RuntimeError, match=missing):
        fo.patch_fastvideo()
    assert not integ.is_patched()


def test_spawned_workers_patch_themselves(patched, monkeypatch):
    """VideoGenerator runs the DiT in spawned worker processes: what they are spawned with is
    a function of ours (pickled by reference), which patches the worker before FastVideo's own
    worker_main runs."""
    import pickle

    from fastvideo.worker.multiproc_executor import WorkerMultiprocProc

    target = WorkerMultiprocProc.worker_main
    assert b"fastvideo_offload.integrations.fastvideo" in pickle.dumps(target)
    seen = {}

    def fastvideos_worker_main(**kwargs):
        seen["patched"] = integ.is_patched()
        seen["kwargs"] = kwargs

    fo.unpatch_fastvideo()  # a fresh worker: nothing patched yet
    monkeypatch.setattr(WorkerMultiprocProc, "worker_main", staticmethod(fastvideos_worker_main))
    integ._worker_main(rank=0)
    assert seen == {"patched": True, "kwargs": {"rank": 0}}
    fo.unpatch_fastvideo()
    assert WorkerMultiprocProc.worker_main is fastvideos_worker_main
    fo.patch_fastvideo()


def test_ltx2_nested_blocks_are_offloaded(patched):
    """FastVideo's own offload skips LTX-2, whose blocks sit one level down (model.transformer_blocks).
    Checked here: found, offloaded, state_dict intact, disable bit-exact (no forward: LTX-2's
    audio-video inputs are out of this test's scope)."""
    from fastvideo.configs.models.dits.ltx2 import LTX2VideoArchConfig, LTX2VideoConfig
    from fastvideo.models.dits.ltx2 import LTX2Transformer3DModel

    arch = LTX2VideoArchConfig(num_attention_heads=2, attention_head_dim=16, num_layers=2, cross_attention_dim=32,
                               caption_channels=32, audio_num_attention_heads=2, audio_attention_head_dim=16,
                               audio_cross_attention_dim=32)
    model = _init(LTX2Transformer3DModel(config=LTX2VideoConfig(arch_config=arch), hf_config={}), 0)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    handle = offload_like_the_loader(model)
    assert handle.block_paths == ["model.transformer_blocks"]
    assert placeholders(model.model.transformer_blocks)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    handle.disable()
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_fastvideos_hook_api_on_every_offloaded_block(patched, monkeypatch, tmp_path):
    """What code written against FastVideo's offload looks up on a block (ModuleHookManager, its
    "LayerwiseOffloadHook", the hook's state and mutate_params_scope) is there on every offloaded
    block, every list of HunyuanVideo included, and means what it meant; FastVideo's activation trace
    shares the block's manager."""
    import json

    from fastvideo.hooks.activation_trace import attach_activation_trace, detach_activation_trace
    from fastvideo.hooks.hooks import ModuleHookManager

    model = tiny_hunyuan()
    reference = copy.deepcopy(model)
    handle = offload_like_the_loader(model)
    blocks = [(name, m) for name, m in model.named_modules() if handle.owns_block(m)]
    assert len(blocks) == 1 + 2 + 3

    def hook_of(block):
        return ModuleHookManager.get_from(block).get_forward_hook("LayerwiseOffloadHook")

    for name, block in blocks:
        state = hook_of(block).state
        assert state.module_ref is block and state.device == handle.device
        expected = dict(reference.get_submodule(name).named_parameters())
        stored = state.cpu_named_parameters
        assert stored.keys() == expected.keys() and all(torch.equal(stored[k], v) for k, v in expected.items())
    assert placeholders(model.single_blocks)

    # a change through FastVideo's scope, in a list FastVideo's own offload never reaches
    block, twin = model.single_blocks[2], reference.single_blocks[2]
    name = next(n for n, p in twin.named_parameters() if p.dim() == 2)
    delta = torch.randn(twin.get_parameter(name).shape) * 0.1
    with torch.no_grad():
        twin.get_parameter(name).add_(delta)
    with hook_of(block).mutate_params_scope(), torch.no_grad():
        block.get_parameter(name).add_(delta)
    assert placeholders(block)
    assert torch.equal(hook_of(block).state.cpu_named_parameters[name], twin.get_parameter(name))

    monkeypatch.setenv("FASTVIDEO_TRACE_ACTIVATIONS", "1")
    monkeypatch.setenv("FASTVIDEO_TRACE_LAYERS", r"^single_blocks\.2$")
    monkeypatch.setenv("FASTVIDEO_TRACE_OUTPUT", str(tmp_path / "trace.jsonl"))
    trace = attach_activation_trace(model)
    for step in range(2):
        assert torch.equal(run(model, step, hunyuan=True), run(reference, step, hunyuan=True))
    detach_activation_trace(trace)
    records = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert {r["module"] for r in records} == {"single_blocks.2"} and len(records) == 2

    # a block cannot leave the offload alone: refused, and nothing changes
    with pytest.raises(NotImplementedError, match=r"fastvideo_offload\.disable\(model\) puts every block back"):
        ModuleHookManager.get_from(block).remove_forward_hook("LayerwiseOffloadHook")
    assert hook_of(block) is not None and placeholders(block)
    assert torch.equal(run(model, 2, hunyuan=True), run(reference, 2, hunyuan=True))
    handle.disable()
    with pytest.raises(RuntimeError, match="offload of this MMSingleStreamBlock was disabled"):
        hook_of(block).mutate_params_scope()


def test_fastvideos_error_for_a_model_without_blocks(patched):
    """FastVideo's call names no lists: its error, with ours, and advice that can be followed."""
    from fastvideo.hooks import layerwise_offload

    with pytest.raises(ValueError, match=r"^No nn\.ModuleList found in the model for layerwise offloading: .* in "
                                         r"Linear .* fastvideo_offload\.enable\(model, blocks=\['path\.to\.list'\]\)$"):
        layerwise_offload.enable_layerwise_offload(torch.nn.Linear(4, 4))


def test_lora_merges_into_every_offloaded_list(patched, monkeypatch, tmp_path):
    """FastVideo's LoRA pipeline on HunyuanVideo: FastVideo files LoRA layers under its first top-level
    list (double_blocks) only; those of single_blocks, which the patch offloads too, reach their
    blocks through mutate as well (before the fix: merged into placeholders, a size mismatch).
    Bit-identical to FastVideo without offload."""
    from safetensors.torch import save_file

    cpu_is_the_local_device(monkeypatch)
    g = torch.Generator().manual_seed(3)
    adapter = {}
    for layer, (out_features, in_features) in {"double_blocks.1.img_attn_proj": (64, 64),
                                               "single_blocks.0.linear2": (64, 192),
                                               "single_blocks.2.linear2": (64, 192)}.items():
        adapter[f"{layer}.lora_A.weight"] = torch.randn(4, in_features, generator=g) * 0.1
        adapter[f"{layer}.lora_B.weight"] = torch.randn(out_features, 4, generator=g) * 0.1
    save_file(adapter, tmp_path / "lora.safetensors")
    lora = dict(lora_path=str(tmp_path / "lora.safetensors"), lora_target_modules=["img_attn_proj", "linear2"])
    model = tiny_hunyuan()
    reference = dit_lora_pipeline(tmp_path / "reference", copy.deepcopy(model), offload=False, **lora)
    offload_like_the_loader(model)
    with torch._dynamo.config.patch(disable=True):  # FastVideo compiles each LoRA layer: both run it eagerly
        pipe = dit_lora_pipeline(tmp_path / "offloaded", model, offload=True, **lora)
        layers = pipe.lora_layers["transformer"]
        assert sorted(layers.block_to_lora_layers) == ["double_blocks.0", "double_blocks.1", "single_blocks.0",
                                                       "single_blocks.1", "single_blocks.2"]
        assert sum(layer.merged for _, layer in layers.all_lora_layers()) == 3
        expected = reference.get_module("transformer")
        for change in (None, "unmerge_lora_weights", "merge_lora_weights"):
            if change:
                getattr(pipe, change)()
                getattr(reference, change)()
            assert placeholders(model.single_blocks[2].linear2.base_layer)
            # FastVideo's CPU-only alias of each LoRA layer's weight: see test_fastvideo_ltx2.assert_same
            state = {k: v for k, v in model.state_dict().items() if not k.endswith(".cpu_weight")}
            assert all(torch.equal(v, expected.state_dict()[k]) for k, v in state.items())
            assert torch.equal(run(model, 1, hunyuan=True), run(expected, 1, hunyuan=True))
