"""What a test needs that a machine may lack: a CUDA GPU, or a library it integrates with."""

import os

import pytest
import torch


def requires_cuda(test):
    """A test that needs a CUDA GPU: skipped without one, and marked `cuda`, by which
    scripts/gpu_check.sh selects the GPU tests outside tests/test_cuda.py (CI runs the rest)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def integration(package: str):
    """Imports a library the integration tests need. `make test` installs them and sets
    FASTVIDEO_OFFLOAD_REQUIRE_INTEGRATIONS=1, so a missing install step fails there; elsewhere
    (a GPU machine without them) the tests skip."""
    if os.environ.get("FASTVIDEO_OFFLOAD_REQUIRE_INTEGRATIONS") == "1":
        import importlib

        return importlib.import_module(package)
    return pytest.importorskip(package)
