"""Wan text-to-video with diffusers, the transformer(s) streamed block by block by
fastvideo_offload. Needs a CUDA GPU, diffusers, accelerate, this package and the weights:

    python examples/diffusers_wan.py --model Wan-AI/Wan2.1-T2V-14B-Diffusers
    python examples/diffusers_wan.py --model Wan-AI/Wan2.2-T2V-A14B-Diffusers   # two experts

The transformers are never whole in host memory: built on the meta device, each is offloaded
straight from its checkpoint files, pinning what the machine can spare and leaving the rest of
its blocks in the files' pages. tests/test_pipeline.py runs `load_pipeline` on a tiny pipeline.
"""

import argparse
import os

import torch

import fastvideo_offload

EXPERTS = ("transformer", "transformer_2")


def load_pipeline(root: str, device: str, dtype: torch.dtype, host_pin_budget="auto", prefetch: int = 1):
    """The WanPipeline saved in folder `root`, its transformer(s) offloaded to `device` from their
    checkpoints within `host_pin_budget` (bytes or "auto"), its other components on `device`."""
    from diffusers import WanPipeline, WanTransformer3DModel

    experts = {}
    for name in EXPERTS:
        folder = os.path.join(root, name)
        if os.path.isdir(folder):
            # One group: when one Wan2.2 expert starts, the other gives its device slots back.
            experts[name] = fastvideo_offload.from_pretrained(
                WanTransformer3DModel, folder, torch_dtype=dtype, device=device, prefetch=prefetch, group="wan",
                host_pin_budget=host_pin_budget)
    pipe = WanPipeline.from_pretrained(root, dtype=dtype, **experts)
    pipe.text_encoder.to(device)
    pipe.vae.to(device)
    return pipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Wan-AI/Wan2.1-T2V-14B-Diffusers", help="hub id or local folder")
    parser.add_argument("--prompt", default="A red fox runs through fresh snow at dawn, cinematic")
    parser.add_argument("--output", default="wan.mp4")
    args = parser.parse_args()

    from diffusers.utils import export_to_video
    from huggingface_hub import snapshot_download

    root = args.model if os.path.isdir(args.model) else snapshot_download(args.model)
    pipe = load_pipeline(root, "cuda", torch.bfloat16)
    frames = pipe(prompt=args.prompt, height=480, width=832, num_frames=81, guidance_scale=5.0).frames[0]
    export_to_video(frames, args.output, fps=16)
    for name in EXPERTS:
        if getattr(pipe, name, None) is not None:
            print(name, fastvideo_offload.handle_of(getattr(pipe, name)).stats())


if __name__ == "__main__":
    main()
