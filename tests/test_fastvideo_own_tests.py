"""FastVideo's own tests of what `patch_fastvideo()` replaces, run from the installed package (not
copied here) in a pytest of their own with the patch applied before they are imported
(tests/support/fastvideo_patched.py): its layerwise offload tests, on a machine without CUDA with the CPU
as their device; its hook API and activation trace, which share the offloaded blocks' hook
managers; its loader's state-dict load, which the patch wraps; and its whole-parameter LoRA patch,
which makes the patched loader load into host memory first."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import pytest
import torch

import fastvideo_offload as fo
from support.needs import integration

fastvideo = integration("fastvideo")
TESTS = os.path.dirname(os.path.abspath(__file__))
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fo.__file__)))
OFFLOAD_TESTS = "hooks/test_layerwise_offload.py"
FASTVIDEO_TESTS = [OFFLOAD_TESTS, "hooks/test_hooks_api.py", "hooks/test_activation_trace.py",
                   "loader/test_fsdp_load_releases_checkpoint.py", "loader/test_lora_patch.py"]
#: FastVideo's 8 layerwise offload tests.
OFFLOAD_TEST_NAMES = {f"test_layerwise_offload_{name}" for name in (
    "basic", "bf16", "multiple_forward_passes", "parameter_integrity", "no_modulelist_error", "memory_reduction",
    "gradient_disabled", "different_batch_sizes")}
ALLOCATOR_TEST = "test_layerwise_offload_memory_reduction"

# FastVideo's own API and code paths on the patch; the engine's ordering runs on both devices elsewhere.
pytestmark = pytest.mark.sync_pass_only


def run_fastvideos_tests(tmp_path) -> dict[tuple[str, str], tuple[str, str]]:
    """(module, test) -> (outcome, message) for each of FastVideo's tests above, run under the patch."""
    root = os.path.join(os.path.dirname(fastvideo.__file__), "tests")
    report = tmp_path / "report.xml"
    # The worktree's package first; nothing written into site-packages (no cache, no bytecode). A port of
    # its own: this process's FastVideo may hold the one in the environment.
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    env |= {"PYTHONPATH": os.pathsep.join([PACKAGE_ROOT, TESTS]), "PYTHONDONTWRITEBYTECODE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "support.fastvideo_patched",
         f"--junitxml={report}", *(os.path.join(root, t) for t in FASTVIDEO_TESTS)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert report.exists(), out.stdout[-3000:] + out.stderr[-3000:]
    outcomes = {}
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        module = case.get("classname").rsplit(".", 1)[-1]
        verdict = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        outcomes[module, case.get("name")] = (
            ("passed", "") if verdict is None else (verdict.tag, verdict.get("message", "")))
    assert out.returncode == 0, out.stdout[-6000:]
    return outcomes


def test_fastvideos_own_tests_pass_under_the_patch(tmp_path):
    outcomes = run_fastvideos_tests(tmp_path)
    modules = {os.path.splitext(os.path.basename(t))[0] for t in FASTVIDEO_TESTS}
    assert {module for module, _ in outcomes} == modules
    offload = {name: verdict for (module, name), verdict in outcomes.items() if module == "test_layerwise_offload"}
    assert offload.keys() == OFFLOAD_TEST_NAMES
    if not torch.cuda.is_available():
        # The CPU has no counterpart of torch.cuda's allocator statistics; the other 7 run on it.
        outcome, message = offload.pop(ALLOCATOR_TEST)
        assert outcome == "skipped" and "torch.cuda's allocator statistics" in message
    others = [verdict for (module, _), verdict in outcomes.items() if module != "test_layerwise_offload"]
    assert len(others) >= 30
    assert all(outcome == "passed" for outcome, _ in [*offload.values(), *others]), outcomes
