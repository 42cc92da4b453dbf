"""Wan2.1 text-to-video with FastVideo's VideoGenerator, its DiT streamed block by block by
fastvideo_offload. Needs a CUDA GPU, FastVideo, this package and the weights:

    python examples/fastvideo_wan.py --model Wan-AI/Wan2.1-T2V-14B-Diffusers --prompt "..."
"""

import argparse

import fastvideo_offload


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="Wan-AI/Wan2.1-T2V-14B-Diffusers", help="hub id or local folder")
    parser.add_argument("--prompt", default="A red fox runs through fresh snow at dawn, cinematic")
    parser.add_argument("--output", default="outputs/")
    args = parser.parse_args()

    # Before the generator exists: its worker processes patch themselves from this too.
    fastvideo_offload.patch_fastvideo()
    from fastvideo import VideoGenerator

    generator = VideoGenerator.from_pretrained(args.model, num_gpus=1, dit_layerwise_offload=True)
    generator.generate_video(args.prompt, output_path=args.output, save_video=True)


if __name__ == "__main__":  # FastVideo spawns its workers: the guard is required
    main()
