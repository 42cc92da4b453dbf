"""The benchmark: the built-in Wan-shaped DiT under every offloader, side by side."""

from .run import main

__all__ = ["main"]
