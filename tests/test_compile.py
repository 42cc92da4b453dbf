"""torch.compile over an offloaded model: the whole model compiled, and each block compiled
(FastVideo's regional compile), both exact and with the hooks eager."""

import copy

import torch

import fastvideo_offload as fo
from support.models import TinyDiT, tiny_input
from support.offloaded import run_passes


def test_a_compiled_model_runs_offloaded_and_exact():
    """The whole model compiled: the model's and the blocks' hooks stay eager (disabled for the
    compiler), so every block is still entered and left, and outputs match the resident model's."""
    torch._dynamo.reset()
    model = TinyDiT()
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cpu", prefetch=1)
    model.compile(backend="eager")
    inputs = [tiny_input() for _ in range(3)]
    for got, expected in zip(run_passes(model, inputs), run_passes(reference, inputs)):
        assert torch.equal(got, expected)
    assert handle.stats()["enters"] == 12 and handle.stats()["running_blocks"] == 0
    torch._dynamo.reset()



def test_compiled_blocks_run_offloaded_without_recompiling():
    """FastVideo compiles each block (regional compile): the hooks stay eager, the compiled block
    takes the swapped-in weights as inputs, and new slots do not trigger recompiles."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = TinyDiT()
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cpu", prefetch=1)
    for block in model.blocks:
        block.compile(backend="aot_eager")
    inputs = [tiny_input() for _ in range(5)]
    for got, expected in zip(run_passes(model, inputs), run_passes(reference, inputs)):
        assert torch.equal(got, expected)
    assert handle.stats()["enters"] == 20
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"]
    torch._dynamo.reset()
