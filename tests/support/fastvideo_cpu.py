"""FastVideo on a CPU for the tests: its set-up (torch SDPA backend, distributed environment on
gloo), its Wan and LTX-2 DiTs at a tiny size with random weights, a forward, its real
TransformerLoader, and its LTX2Pipeline around a DiT (the other components are not built)."""

import json
import os
import socket

import torch

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
           text_dim=64, freq_dim=64, ffn_dim=128, num_layers=3, rope_max_seq_len=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def on_cpu(sp: int = 1) -> None:
    """FastVideo's distributed environment (WORLD_SIZE ranks, sequence parallelism `sp`) on gloo."""
    os.environ["FASTVIDEO_ATTENTION_BACKEND"] = "TORCH_SDPA"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    from fastvideo.platforms.cpu import CpuPlatform

    if not hasattr(CpuPlatform, "get_attn_backend_cls") or CpuPlatform.get_attn_backend_cls.__qualname__.startswith(
        "Platform."
    ):
        # FastVideo 0.2.1's CPU platform names no attention backend; its MPS platform names SDPA.
        CpuPlatform.get_attn_backend_cls = classmethod(
            lambda cls, selected_backend, head_size, dtype: "fastvideo.attention.backends.sdpa.SDPABackend"
        )
    from fastvideo.distributed.parallel_state import maybe_init_distributed_environment_and_model_parallel

    maybe_init_distributed_environment_and_model_parallel(1, sp)


def _init(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # FastVideo's linears start from torch.empty
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=0.05)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                torch.nn.init.normal_(p, std=0.01)
    return model.eval()


def tiny_wan(seed=0, layers=3):
    from fastvideo.configs.models.dits.wanvideo import WanVideoArchConfig, WanVideoConfig
    from fastvideo.models.dits.wanvideo import WanTransformer3DModel

    arch = WanVideoArchConfig(num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
                              text_dim=64, freq_dim=64, ffn_dim=128, num_layers=layers, patch_size=(1, 2, 2),
                              rope_max_seq_len=64)
    return _init(WanTransformer3DModel(config=WanVideoConfig(arch_config=arch), hf_config={}), seed)


def run(model, step=0, hunyuan=False, dtype=torch.float32):
    from fastvideo.forward_context import set_forward_context

    g = torch.Generator().manual_seed(step)
    latents = torch.randn(1, 16, 4, 8, 8, generator=g).to(dtype)
    text = torch.randn(1, 8, 64, generator=g).to(dtype)
    if hunyuan:
        text = [text, torch.randn(1, 32, generator=g)]
    with torch.no_grad(), set_forward_context(current_timestep=step, attn_metadata=None, forward_batch=None):
        return model(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([10 + step]))


def save_wan(path, max_shard_size="200KB", **config):
    """A random Wan DiT in the diffusers format FastVideo's loader reads: config.json, shards, index."""
    import diffusers

    torch.manual_seed(0)
    diffusers.WanTransformer3DModel(**{**WAN, **config}).save_pretrained(path, max_shard_size=max_shard_size)


def _args(path, offload, pipeline_config=None, **kwargs):
    from fastvideo.configs.pipelines.wan import WanT2V480PConfig
    from fastvideo.fastvideo_args import FastVideoArgs

    return FastVideoArgs(model_path=str(path), pipeline_config=pipeline_config or WanT2V480PConfig(),
                         inference_mode=True, dit_layerwise_offload=offload, hsdp_shard_dim=1, hsdp_replicate_dim=1,
                         **kwargs)


def load(path, offload: bool, pipeline_config=None, **kwargs):
    """FastVideo's TransformerLoader on `path`, on the CPU (FastVideo itself would pick 'mps' there),
    with its layerwise offload on or off; `kwargs` go to FastVideoArgs (lora_path=...)."""
    from fastvideo.models.loader import component_loader

    args = _args(path, offload, pipeline_config, **kwargs)
    device = component_loader.get_local_torch_device
    component_loader.get_local_torch_device = lambda: torch.device("cpu")
    try:
        return component_loader.TransformerLoader().load(str(path), args)
    finally:
        component_loader.get_local_torch_device = device


#: A tiny LTX-2 (audio and video): two blocks in model.transformer_blocks, one level down.
LTX2 = dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, cross_attention_dim=16, caption_channels=16,
            num_channels_latents=8, in_channels=8, out_channels=8, audio_num_attention_heads=2,
            audio_attention_head_dim=8, audio_in_channels=8, audio_out_channels=8, audio_cross_attention_dim=16,
            connector_num_attention_heads=2, connector_attention_head_dim=8, connector_num_layers=1,
            audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=8,
            audio_connector_num_layers=1)


def tiny_ltx2(seed=0):
    from fastvideo.configs.models.dits.ltx2 import LTX2VideoArchConfig, LTX2VideoConfig
    from fastvideo.models.dits.ltx2 import LTX2Transformer3DModel

    config = LTX2VideoConfig(arch_config=LTX2VideoArchConfig(**LTX2))
    return _init(LTX2Transformer3DModel(config=config, hf_config={}), seed)


def save_ltx2(path, seed=0):
    """A random tiny LTX-2 DiT as FastVideo's TransformerLoader reads it: config.json and one file."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"_class_name": "LTX2Transformer3DModel", **LTX2}, f)
    save_file({k: v.contiguous() for k, v in tiny_ltx2(seed).state_dict().items()},
              os.path.join(path, "diffusion_pytorch_model.safetensors"))


def run_ltx2(model, step=0, dtype=torch.bfloat16):
    """One forward of the tiny LTX-2 (video and audio latents); its output tensors."""
    from fastvideo.forward_context import set_forward_context

    g = torch.Generator().manual_seed(step)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    with torch.no_grad(), set_forward_context(current_timestep=step, attn_metadata=None, forward_batch=None):
        out = model(hidden_states=r(1, 8, 2, 4, 4), encoder_hidden_states=r(1, 6, 16),
                    timestep=torch.tensor([0.5]), audio_hidden_states=r(1, 8, 5, 1),
                    audio_encoder_hidden_states=r(1, 6, 16), audio_timestep=torch.tensor([0.5]))
    return [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]


def cpu_is_the_local_device(monkeypatch) -> None:
    """FastVideo's loader, LoRA pipeline and LoRA layers put what they load on the CPU (FastVideo
    itself would pick 'mps' on a machine without CUDA)."""
    from fastvideo.layers.lora import linear as lora_linear
    from fastvideo.models.loader import component_loader
    from fastvideo.pipelines import lora_pipeline

    for module in (component_loader, lora_pipeline, lora_linear):
        monkeypatch.setattr(module, "get_local_torch_device", lambda: torch.device("cpu"))


def ltx2_pipeline(root, transformer, offload: bool, **kwargs):
    """FastVideo's LTX2Pipeline at `root`, its DiT loaded by FastVideo's loader from `transformer`
    (a checkpoint directory), every other component a placeholder that nothing here calls;
    `kwargs` go to FastVideoArgs (lora_path=...). Needs cpu_is_the_local_device."""
    import shutil

    from fastvideo.pipelines.basic.ltx2.ltx2_pipeline import LTX2Pipeline
    from fastvideo.pipelines.basic.ltx2.pipeline_configs import LTX2T2VConfig

    others = [m for m in LTX2Pipeline._required_config_modules if m != "transformer"]
    for module in others:
        os.makedirs(os.path.join(root, module), exist_ok=True)
    shutil.copytree(transformer, os.path.join(root, "transformer"), dirs_exist_ok=True)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "LTX2Pipeline", "_diffusers_version": "0.0",
                   **{m: ["diffusers", "unused"] for m in LTX2Pipeline._required_config_modules}}, f)
    args = _args(root, offload, LTX2T2VConfig(), **kwargs)
    return LTX2Pipeline(str(root), args, loaded_modules={m: object() for m in others})


def dit_lora_pipeline(root, dit, offload: bool, **kwargs):
    """FastVideo's LoRAPipeline around `dit` alone (no stages), at `root`; `kwargs` go to
    FastVideoArgs (lora_path=...). Needs cpu_is_the_local_device."""
    from fastvideo.pipelines.lora_pipeline import LoRAPipeline

    class DiTOnly(LoRAPipeline):
        _required_config_modules = ["transformer"]

        def create_pipeline_stages(self, fastvideo_args):
            pass

    os.makedirs(os.path.join(root, "transformer"), exist_ok=True)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        # FastVideo wants two components at least; one without a library is left out
        json.dump({"_class_name": "DiTOnly", "_diffusers_version": "0.0", "transformer": ["diffusers", "unused"],
                   "vae": [None, None]}, f)
    return DiTOnly(str(root), _args(root, offload, **kwargs), loaded_modules={"transformer": dit})
