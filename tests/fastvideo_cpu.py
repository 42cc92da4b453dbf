"""FastVideo on a CPU for the tests: its set-up (torch SDPA backend, distributed environment on
gloo), its Wan DiT at a tiny size with random weights, a forward, and its real TransformerLoader."""

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


def load(path, offload: bool):
    """FastVideo's TransformerLoader on `path`, on the CPU (FastVideo itself would pick 'mps' there),
    with its layerwise offload on or off."""
    from fastvideo.configs.pipelines.wan import WanT2V480PConfig
    from fastvideo.fastvideo_args import FastVideoArgs
    from fastvideo.models.loader import component_loader

    args = FastVideoArgs(model_path=str(path), pipeline_config=WanT2V480PConfig(), inference_mode=True,
                         dit_layerwise_offload=offload, hsdp_shard_dim=1, hsdp_replicate_dim=1)
    device = component_loader.get_local_torch_device
    component_loader.get_local_torch_device = lambda: torch.device("cpu")
    try:
        return component_loader.TransformerLoader().load(str(path), args)
    finally:
        component_loader.get_local_torch_device = device
