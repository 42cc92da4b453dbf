"""The compatibility sweep's configurations in one place, for tests/test_sweep.py,
tests/test_sweep_fastvideo.py and anything that lists the sweep: diffusers' classes
(sweep_diffusers.py) and FastVideo's DiTs (sweep_fastvideo.py), each a Case (sweep_case.py)."""

from .sweep_case import Case
from .sweep_diffusers import DIFFUSERS, FULL_SIZE_SHARE
from .sweep_fastvideo import FASTVIDEO, FASTVIDEO_FULL_SIZE_SHARE, FASTVIDEO_TINY

__all__ = ["Case", "DIFFUSERS", "FULL_SIZE_SHARE", "FASTVIDEO", "FASTVIDEO_FULL_SIZE_SHARE", "FASTVIDEO_TINY"]
