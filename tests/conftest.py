import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


def requires_cuda(test):
    """A test that needs a CUDA GPU: skipped without one, and marked `cuda`, by which
    scripts/gpu_check.sh selects the GPU tests outside tests/test_cuda.py (CI runs the rest)."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def integration(package: str):
    """Imports a library the integration tests need. `make test` installs them and sets
    FASTVIDEO_OFFLOAD_REQUIRE_INTEGRATIONS=1, so a missing install step fails there; elsewhere
    (a GPU machine without them) the tests skip."""
    if os.environ.get("FASTVIDEO_OFFLOAD_REQUIRE_INTEGRATIONS") == "1":
        import importlib

        return importlib.import_module(package)
    return pytest.importorskip(package)
