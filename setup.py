"""Builds fastvideo_offload._C with torch.utils.cpp_extension.

CUDA build when the installed torch is a CUDA build and nvcc is found (no GPU needed to
compile); CPU build otherwise, or when FASTVIDEO_OFFLOAD_CPU_ONLY=1.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

# Ampere to Hopper; without a visible GPU torch cannot guess the arch list (pytorch#137261).
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def _find_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc is a wrapper script."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    on_path = os.path.dirname(os.path.dirname(os.path.realpath(shutil.which("nvcc") or "")))
    for candidate in ("/usr/local/cuda", on_path):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")) and os.path.isdir(
            os.path.join(candidate, "include")
        ):
            os.environ["CUDA_HOME"] = candidate
            return


_find_cuda_home()

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension reads it)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    if os.environ.get("FASTVIDEO_OFFLOAD_CPU_ONLY", "0") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None and os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc")
    )


def _extension():
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fvisibility=hidden"]
    link = []
    sanitizers = os.environ.get("FASTVIDEO_OFFLOAD_SANITIZE")  # e.g. "address,undefined": scripts/sanitize.sh
    if sanitizers:
        cxx = ["-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitizers}", "-fno-sanitize=vptr",
               "-fno-sanitize-recover=all", "-fvisibility=hidden"]
        link = [f"-fsanitize={sanitizers}"]
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        cuda = os.path.join("csrc", "cuda")
        sources += sorted(glob.glob(os.path.join(cuda, "*.cpp")) + glob.glob(os.path.join(cuda, "*.cu")))
        return CUDAExtension(
            "fastvideo_offload._C",
            sources,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=[("FVO_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link,
        )
    return CppExtension(
        "fastvideo_offload._C",
        sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


class _BuildExtension(BuildExtension):
    """pip's editable install compiles in a fresh temporary folder each time; in the folder a wheel
    build uses instead, ninja recompiles only what changed, and `make wheel` after `make test`
    reuses every object."""

    def finalize_options(self):
        super().finalize_options()
        if getattr(self, "editable_mode", False):
            here = os.path.dirname(os.path.abspath(__file__))
            self.build_temp = os.path.join(here, "build", f"temp.{self.plat_name}-{sys.implementation.cache_tag}")


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExtension},
)
