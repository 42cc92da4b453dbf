"""A pytest plugin (`-p support.fastvideo_patched`) under which FastVideo's own installed tests run with
`patch_fastvideo()` applied before any of them is imported (tests/test_fastvideo_own_tests.py).

On a machine without CUDA, FastVideo's tests that skip there ("CUDA not available": its layerwise
offload tests) run on the CPU instead: while each runs, a `cuda` device given to a torch function
(`.to(device)`, `torch.randn(..., device=device)`) means the CPU, where the patch offloads to. The
one that measures torch.cuda's allocator, which the CPU has no counterpart of, is skipped, saying so.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastvideo_offload as fo

#: FastVideo's CUDA tests that read torch.cuda's memory statistics.
NO_CPU_COUNTERPART = {
    "test_layerwise_offload_memory_reduction": "reads torch.cuda's allocator statistics, which the CPU has no "
                                               "counterpart of",
}
_CUDA = re.compile(r"cuda(:\d+)?")


def pytest_configure(config):
    fo.patch_fastvideo()


def _skips_without_cuda(mark) -> bool:
    return mark.name == "skipif" and "CUDA" in str(mark.kwargs.get("reason", ""))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    for item in items:
        cuda_only = any(_skips_without_cuda(m) for m in item.own_markers)
        item.own_markers = [m for m in item.own_markers if not _skips_without_cuda(m)]
        if cuda_only:
            item.user_properties.append(("on_cpu", True))
            if item.originalname in NO_CPU_COUNTERPART:
                item.add_marker(pytest.mark.skip(reason=NO_CPU_COUNTERPART[item.originalname]))


def _on_cpu(value):
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    if isinstance(value, str) and _CUDA.fullmatch(value):
        return "cpu"
    return value


class _CudaMeansCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*map(_on_cpu, args), **{k: _on_cpu(v) for k, v in (kwargs or {}).items()})


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    if ("on_cpu", True) not in item.user_properties:
        return (yield)
    with _CudaMeansCpu():
        return (yield)
