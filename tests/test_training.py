"""LoRA fine-tuning through offloaded blocks: every trainable parameter's gradient, the weights
after AdamW steps and the outputs are bit-identical to the same model trained without offload,
with and without gradient checkpointing (reentrant or not), gradient accumulation, bf16 autocast,
resident blocks under a device budget and staged blocks; the copies per step are counted; and the
faults the design guards against make these checks fail (docs/training.md)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastvideo_offload as fo
from fastvideo_offload import training
from fastvideo_offload.offloader import footprint
from support.models import TinyDiT, tiny_input
from support.needs import integration
from support.offloaded import assert_dropping_frees_the_engine

LAYERS = 5


class LoRA(nn.Module):
    """A frozen linear layer plus a trainable low-rank update; B starts non-zero, or every A's
    first gradient would be zero and compare trivially."""

    def __init__(self, base: nn.Linear, rank: int = 4):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) * 0.1)
        self.B = nn.Parameter(torch.randn(base.out_features, rank, dtype=base.weight.dtype) * 0.1)

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.A), self.B)


class CheckpointedDiT(TinyDiT):
    """TinyDiT whose blocks run under torch.utils.checkpoint when `checkpointing` says how."""

    checkpointing: str | None = None

    def forward(self, x):
        x = self.embed(x) + self.freqs
        for block in self.blocks:
            if self.checkpointing is None or not torch.is_grad_enabled():
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.checkpointing == "reentrant")
        return self.head(x)


def lora_dit(checkpointing=None, dtype=torch.float32, affine_norms=True) -> CheckpointedDiT:
    """LoRA on every block's attention projections. Autograd saves layer norm's weight as the
    Parameter itself, and the linear layers' as views made in the forward: `affine_norms=False`
    leaves only the views, whose stale bytes no shape check catches."""
    model = CheckpointedDiT(layers=LAYERS, dtype=dtype)
    model.checkpointing = checkpointing
    for block in model.blocks:
        if not affine_norms:
            block.norm = nn.LayerNorm(block.norm.normalized_shape, elementwise_affine=False, dtype=dtype)
    model.requires_grad_(False)
    for block in model.blocks:
        block.qkv, block.proj = LoRA(block.qkv), LoRA(block.proj)
    return model


def train(model, batches, steps=3, accumulate="each", autocast=False):
    """AdamW steps over micro-batches; every trainable gradient of every step, then an output."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    grads = []
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if accumulate == "each":  # a backward per micro-batch
                for x in batches:
                    model(x).float().pow(2).mean().backward()
            else:  # every micro-batch's forward, then one backward
                sum(model(x).float().pow(2).mean() for x in batches).backward()
        grads.append([p.grad.clone() for p in trainable])
        optimizer.step()
    with torch.no_grad():
        return grads, model(batches[0])


def assert_trains_exactly(make_model, batches, enable_kwargs=None, **train_kwargs):
    reference = make_model()
    offloaded = copy.deepcopy(reference)
    expected_grads, expected_out = train(reference, batches, **train_kwargs)
    handle = fo.enable(offloaded, device="cpu", **(enable_kwargs or {}))
    grads, out = train(offloaded, batches, **train_kwargs)
    for step, (want, got) in enumerate(zip(expected_grads, grads)):
        for i, (w, g) in enumerate(zip(want, got)):
            assert torch.equal(w, g), f"step {step}: gradient {i} differs by {(w - g).abs().max()}"
    assert torch.equal(expected_out, out)
    stats = handle.stats()
    assert stats["held_blocks"] == 0 and stats["running_blocks"] == 0
    handle.disable()
    for (name, a), b in zip(reference.named_parameters(), offloaded.parameters()):
        assert torch.equal(a, b), name
    return handle, stats


def batches(requires_grad=False):
    return [tiny_input().requires_grad_(requires_grad), tiny_input().requires_grad_(requires_grad)]


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("accumulate", ["each", "summed"])
@pytest.mark.parametrize("checkpointing", [None, "non-reentrant", "reentrant"])
def test_lora_trains_bit_identically(checkpointing, accumulate, autocast, prefetch):
    # Reentrant checkpointing gives no gradients unless an input requires grad, offloaded or not.
    assert_trains_exactly(lambda: lora_dit(checkpointing), batches(checkpointing == "reentrant"),
                          dict(prefetch=prefetch), accumulate=accumulate, autocast=autocast)


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant"])
def test_bf16_weights_train_bit_identically(checkpointing):
    assert_trains_exactly(lambda: lora_dit(checkpointing, dtype=torch.bfloat16),
                          [x.bfloat16() for x in batches()], dict(prefetch=1))


def test_resident_blocks_under_a_device_budget_train_exactly_and_are_never_copied():
    fixed, sizes = footprint(lora_dit())
    # Room for what stays, two resident blocks and a ring of two slots.
    budget = fixed + 2 * max(sizes) + 2 * max(sizes)
    _, stats = assert_trains_exactly(lambda: lora_dit(), batches(), dict(prefetch=1, device_budget=budget))
    assert stats["resident_blocks"] == 2 and stats["streamed_blocks"] == LAYERS - 2


def test_staged_blocks_train_exactly():
    _, stats = assert_trains_exactly(lambda: lora_dit(), batches(), dict(prefetch=1, host_pin_budget=0))
    assert stats["staged_blocks"] == LAYERS and stats["stagings"] > 0


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("checkpointing", [None, "non-reentrant"])
def test_each_streamed_block_is_copied_once_each_way_per_step(checkpointing, prefetch):
    """In steady state a forward copies the streamed blocks the ring does not still hold from the
    last backward (its tail is the next forward's head), and the backward those the ring does not
    still hold from the forward: S - min(ring, S) each way; resident blocks none. Checkpointing's
    recompute runs while its block is held: no copy."""
    model = lora_dit(checkpointing)
    handle = fo.enable(model, device="cpu", prefetch=prefetch)
    x = tiny_input()
    model(x).pow(2).mean().backward()  # warm-up: the ring and the order are set
    before = handle.stats()
    model(x).pow(2).mean().backward()
    after = handle.stats()
    ring, streamed = prefetch + 1, LAYERS
    expected = streamed - min(ring, streamed)
    backward = after["backward_uploads"] - before["backward_uploads"]
    forward = after["uploads"] - before["uploads"] - backward
    assert (forward, backward) == (expected, expected)
    block_bytes = after["slot_bytes"]
    assert after["h2d_bytes"] - before["h2d_bytes"] == 2 * expected * block_bytes
    assert after["held_blocks"] == 0
    handle.disable()


def test_held_blocks_stay_within_the_ring_inside_a_backward():
    """Checked from inside the backward, at every block's output gradient: the blocks held never
    exceed the ring, and the block whose backward starts is held with its parameters on the device."""
    model = lora_dit()
    handle = fo.enable(model, device="cpu", prefetch=1)
    seen = []

    def probe(block):
        def on_grad(grad):
            stats = handle.stats()
            seen.append((stats["held_blocks"], stats["device_slots"],
                         all(p.numel() > 0 for p in block.parameters())))
        return on_grad

    x = model.embed(tiny_input()) + model.freqs
    outputs = []
    for block in model.blocks:
        x = block(x)
        outputs.append(x)
    for block, out in zip(model.blocks, outputs):
        out.register_hook(probe(block))  # runs after the engine's hook, registered in the forward
    model.head(x).pow(2).mean().backward()
    assert len(seen) == LAYERS
    assert all(1 <= held <= 2 and slots <= 2 and on_device for held, slots, on_device in seen), seen
    assert handle.stats()["held_blocks"] == 0
    handle.disable()


def test_lora_parameters_stay_on_the_device_and_out_of_the_host_store():
    model = lora_dit()
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen_bytes = sum(p.nbytes for n, p in model.blocks.named_parameters() if not p.requires_grad)
    handle = fo.enable(model, device="cpu")
    for name, p in model.named_parameters():
        if name in lora:
            assert torch.equal(p, lora[name]), name  # a real tensor, not a placeholder
    assert handle.stats()["host_bytes"] >= frozen_bytes
    assert handle.stats()["host_bytes"] < frozen_bytes + sum(t.nbytes for t in lora.values())
    handle.disable()


def test_a_backward_after_its_slots_were_freed_raises_and_the_model_recovers():
    model = lora_dit()
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cpu", prefetch=1)
    x = tiny_input()
    loss = model(x).pow(2).mean()
    handle.trim()
    with pytest.raises(RuntimeError, match=r"block blocks\.\d: backward: the device memory block \d's forward ran in "
                       r"was freed or given another use before its backward \(trim"):
        loss.backward()
    assert handle.stats()["held_blocks"] == 0  # the next forward (or trim) releases what the failed backward held
    model.zero_grad()
    assert_grads_equal(model, reference, x)
    handle.disable()


def test_a_weight_change_between_forward_and_backward_raises():
    model = lora_dit()
    handle = fo.enable(model, device="cpu")
    loss = model(tiny_input()).pow(2).mean()
    with handle.mutate(model.blocks[0]):
        pass
    with pytest.raises(RuntimeError, match=r"backward: the weights of block \d changed between its forward and its "
                       r"backward"):
        loss.backward()
    handle.trim()
    assert handle.stats()["held_blocks"] == 0
    handle.disable()


def assert_grads_equal(model, reference, x):
    model(x).pow(2).mean().backward()
    reference(x).pow(2).mean().backward()
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        if a.requires_grad:
            assert torch.equal(a.grad, b.grad), name


def _faulty(monkeypatch, fault):
    if fault == "no re-fetch":  # backward reads whatever the slot holds by then
        monkeypatch.setattr(training._ops, "engine_hold", lambda engine, block, token: None)
        monkeypatch.setattr(training._ops, "engine_unhold", lambda engine, block: None)
    elif fault == "released at once":  # the release in the wrong hook: before the block's backward ran
        hold = training._ops.engine_hold

        def hold_and_release(engine, block, token):
            hold(engine, block, token)
            training._ops.engine_unhold(engine, block)

        monkeypatch.setattr(training._ops, "engine_hold", hold_and_release)
        monkeypatch.setattr(training._Instance, "release", lambda self, *grads: None)


@pytest.mark.parametrize("fault", ["no re-fetch", "released at once"])
def test_the_exactness_check_fails_when_a_guard_is_removed(monkeypatch, fault):
    """Without the re-fetch, or with a release that comes too early, the check above fails. Where
    a block's backward reads its layer norm's weight (a Parameter), autograd finds a placeholder."""
    _faulty(monkeypatch, fault)
    with pytest.raises(RuntimeError, match="normalized_shape"):
        assert_trains_exactly(lambda: lora_dit(), batches(), dict(prefetch=1), steps=1)


@pytest.mark.parametrize("fault", ["no re-fetch", "released at once"])
def test_stale_bytes_read_by_a_backward_give_other_gradients(monkeypatch, fault):
    """Where a backward reads only views saved in the forward, nothing but the values shows the
    fault: without the re-fetch the views read another block's bytes (both devices); a release
    before the block's backward lets the asynchronous device poison its slot (the synchronous one
    writes no slot before that backward, so there the early release reads the right bytes)."""
    if fault == "released at once" and os.environ.get("FASTVIDEO_OFFLOAD_CPU_TRANSFER") != "async":
        pytest.skip("only the asynchronous device poisons a released slot")
    # Releases complete (and poison) with no added lag: each of the 10 block backwards a step runs
    # reads its slot well after that.
    monkeypatch.setenv("FASTVIDEO_OFFLOAD_ASYNC_DELAY_US", "0")
    make = lambda: lora_dit(affine_norms=False)  # noqa: E731
    assert_trains_exactly(make, batches(), dict(prefetch=1), steps=1)  # exact without the fault
    _faulty(monkeypatch, fault)
    with pytest.raises(AssertionError, match="gradient .* differs by"):
        assert_trains_exactly(make, batches(), dict(prefetch=1), steps=1)


def test_a_forward_in_grad_mode_without_backward_changes_nothing():
    """Inference without no_grad (frozen weights, LoRA) gives the resident model's output, leaves no
    hold, and the next inference forward runs the usual way."""
    model = lora_dit()
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cpu")
    x = tiny_input()
    assert torch.equal(model(x), reference(x))
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    assert handle.stats()["held_blocks"] == 0
    handle.disable()


# diffusers' Wan with peft's LoRA, as users fine-tune it.
WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
           text_dim=64, freq_dim=64, ffn_dim=128, num_layers=3, rope_max_seq_len=64)


def wan_with_lora(checkpointing: bool):
    diffusers = integration("diffusers")
    peft = integration("peft")
    model = diffusers.WanTransformer3DModel(**WAN)
    # init_lora_weights=False: B starts random, so A's first gradients are not all zero.
    config = peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    peft.inject_adapter_in_model(config, model)
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def wan_batches():
    g = torch.Generator().manual_seed(0)
    return [dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g), timestep=torch.tensor([10 * i + 5]),
                 encoder_hidden_states=torch.randn(1, 8, 64, generator=g)) for i in range(2)]


def train_wan(model, inputs, steps=2):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    grads = []
    for _ in range(steps):
        optimizer.zero_grad()
        for kwargs in inputs:
            model(**kwargs, return_dict=False)[0].pow(2).mean().backward()
        grads.append([p.grad.clone() for p in trainable])
        optimizer.step()
    with torch.no_grad():
        return grads, model(**inputs[0], return_dict=False)[0]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_diffusers_wan_with_peft_lora_trains_bit_identically(checkpointing):
    torch.manual_seed(0)
    reference = wan_with_lora(checkpointing)
    trainable = [n for n, p in reference.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)  # peft froze the base itself
    model = copy.deepcopy(reference)
    inputs = wan_batches()
    expected_grads, expected_out = train_wan(reference, inputs)
    handle = fo.enable(model, device="cpu", prefetch=1)
    grads, out = train_wan(model, inputs)
    assert all(g.abs().sum() > 0 for g in grads[0])
    for want, got in zip(expected_grads, grads):
        for name, w, g in zip(trainable, want, got):
            assert torch.equal(w, g), name
    assert torch.equal(expected_out, out)
    assert handle.stats()["backward_uploads"] > 0 and handle.stats()["held_blocks"] == 0
    handle.disable()
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name



def test_peft_lora_injected_after_enable_trains_bit_identically():
    """Adapters added to an offloaded model are made on the device beside the placeholders, never
    enter the host store, and train as on the model without offload."""
    diffusers, peft = integration("diffusers"), integration("peft")
    config = peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"])
    torch.manual_seed(0)
    reference = diffusers.WanTransformer3DModel(**WAN)
    model = copy.deepcopy(reference)
    torch.manual_seed(1)
    peft.inject_adapter_in_model(config, reference)
    handle = fo.enable(model, device="cpu", prefetch=1)
    host_bytes = handle.stats()["host_bytes"]
    torch.manual_seed(1)
    peft.inject_adapter_in_model(config, model)
    assert handle.stats()["host_bytes"] == host_bytes
    inputs = wan_batches()
    expected_grads, expected_out = train_wan(reference, inputs)
    grads, out = train_wan(model, inputs)
    for want, got in zip(expected_grads, grads):
        assert all(torch.equal(w, g) for w, g in zip(want, got))
    assert torch.equal(expected_out, out)
    handle.disable()
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(a, b), name


def test_in_eval_mode_trainable_block_parameters_stream_and_the_backward_says_to_call_train():
    """Inference models mix frozen and trainable parameters too (FastVideo's, torchao's), so only a
    model in training mode keeps its trainable block parameters resident; one enabled in eval mode
    streams them, and its first backward names the fix. Nothing is lost."""
    model = lora_dit().eval()
    reference = copy.deepcopy(model)
    block_bytes = sum(p.nbytes for p in model.blocks.parameters())
    handle = fo.enable(model, device="cpu")
    assert handle.stats()["host_bytes"] >= block_bytes
    with pytest.raises(RuntimeError, match=r"offloaded parameters require grad .*call model\.train\(\) before enable"):
        model(tiny_input()).pow(2).mean().backward()
    assert handle.stats()["held_blocks"] == 0
    handle.disable()
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(a, b) and a.requires_grad == b.requires_grad, name
    assert fo.enable(model.train(), device="cpu").stats()["host_bytes"] < block_bytes


def test_a_model_dropped_after_a_training_step_frees_its_engine_without_a_gc_pass():
    model = lora_dit().train()
    fo.enable(model, device="cpu", prefetch=1)
    train(model, batches(), steps=1)
    models = [model]
    del model
    assert_dropping_frees_the_engine(models)
