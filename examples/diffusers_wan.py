"""Wan text-to-video with diffusers, the transformer(s) streamed block by block by
fastvideo_offload. Needs a CUDA GPU, diffusers, this package and the weights:

    python examples/diffusers_wan.py --model Wan-AI/Wan2.1-T2V-14B-Diffusers
    python examples/diffusers_wan.py --model Wan-AI/Wan2.2-T2V-A14B-Diffusers   # two experts
"""

import argparse

import torch
from diffusers import WanPipeline
from diffusers.utils import export_to_video

import fastvideo_offload


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Wan-AI/Wan2.1-T2V-14B-Diffusers", help="hub id or local folder")
    parser.add_argument("--prompt", default="A red fox runs through fresh snow at dawn, cinematic")
    parser.add_argument("--output", default="wan.mp4")
    args = parser.parse_args()

    # Loaded into host memory; enable() packs each block into pinned memory as it goes, so the
    # GPU never holds a whole transformer.
    pipe = WanPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16)
    experts = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
    for transformer in experts:
        # One group: when one Wan2.2 expert starts, the other gives its device slots back.
        fastvideo_offload.enable(transformer, device="cuda", prefetch=1, group="wan")
    pipe.text_encoder.to("cuda")
    pipe.vae.to("cuda")

    frames = pipe(prompt=args.prompt, height=480, width=832, num_frames=81, guidance_scale=5.0).frames[0]
    export_to_video(frames, args.output, fps=16)
    for transformer in experts:
        print(type(transformer).__name__, fastvideo_offload.handle_of(transformer).stats())


if __name__ == "__main__":
    main()
