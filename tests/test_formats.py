"""Weight formats under offload: torchao tensor subclasses, diffusers GGUF, plain fp8 with a scale
(all bit-identical, state_dict keeping the format), bitsandbytes refused, and a forward that
replaces a weight's data refused loudly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from support.needs import integration
from support.models import TinyDiT
from support.offloaded import packed_bytes
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

import fastvideo_offload as fo

X = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(1))


def _plain_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding `t`'s bytes: a wrapper subclass's inner tensors, recursively."""
    if is_traceable_wrapper_subclass(t):
        return [u for a in t.__tensor_flatten__()[0] for u in _plain_parts(getattr(t, a))]
    with torch._C.DisableTorchFunctionSubclass():
        return [t.detach()]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same type, same bytes in every part, same subclass attributes (GGUF's quant_type)."""
    parts_a, parts_b = _plain_parts(a), _plain_parts(b)
    return (
        type(a) is type(b)
        and getattr(a, "quant_type", None) == getattr(b, "quant_type", None)
        and len(parts_a) == len(parts_b)
        and all(u.dtype == v.dtype and u.stride() == v.stride() and torch.equal(u, v) for u, v in zip(parts_a, parts_b))
    )


def _tiny(seed: int) -> TinyDiT:
    """A TinyDiT whose every weight is random (LayerNorm's start as ones and zeros), in eval mode as
    loaders hand a model over: quantized weights are frozen, and in training mode the trainable
    biases and norms beside them would stay resident as LoRA's do."""
    torch.manual_seed(seed)
    model = TinyDiT(dim=32, layers=3)
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, nn.LayerNorm):
                norm.weight.normal_(1, 0.1)
                norm.bias.normal_(0, 0.1)
    return model.eval()


def _roundtrip(make, prefetch: int = 1) -> None:
    """`make(seed)` builds a model in some weight format. Offloaded, it gives bit-identical outputs
    with exactly its blocks' bytes in host memory and none left in the module; its state_dict keeps
    the format; loading another model's state_dict changes the output to that model's; disable
    puts the other model's weights back in the same parameter objects."""
    # Built twice rather than deep-copied: diffusers' GGUFParameter cannot be deep-copied.
    model, reference, other = make(0), make(0), make(1)
    with torch.no_grad():
        expected, changed = reference(X), other(X)
    assert not torch.equal(expected, changed)
    block_parts = [[u for p in block.parameters() for u in _plain_parts(p)] for block in model.blocks]
    block_sizes = [[torch.empty_like(u, device="meta") for u in parts] for parts in block_parts]
    # Non-trivial weights: each parameter's largest part (its quantized data) is not constant.
    largest = [max(_plain_parts(p), key=torch.numel) for p in model.blocks.parameters()]
    assert all(u.numel() > 1 and u.float().std() > 0 for u in largest)
    params = dict(model.named_parameters())

    del block_parts, largest  # only the model may hold the blocks' bytes now, so that they are freed
    handle = fo.enable(model, device="cpu", prefetch=prefetch)
    assert handle.stats()["host_bytes"] == sum(packed_bytes(parts) for parts in block_sizes)
    assert handle.stats()["retained_bytes"] == 0
    for name, p in model.named_parameters():
        assert p is params[name]
        assert all(u.numel() == 0 for u in _plain_parts(p)) == name.startswith("blocks."), name
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(X), expected)
    state = model.state_dict()
    for key, value in reference.state_dict().items():
        assert _same(state[key], value), key

    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(model(X), changed)
    handle.disable()
    assert dict(model.named_parameters()) == params
    for (name, p), q in zip(model.named_parameters(), other.parameters()):
        assert _same(p, q), name
    with torch.no_grad():
        assert torch.equal(model(X), changed)


def _torchao_config(kind: str):
    quantization = integration("torchao").quantization
    return {
        "int8": lambda: quantization.Int8WeightOnlyConfig(),
        "float8": lambda: quantization.Float8WeightOnlyConfig(),
        "intx": lambda: quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4),
    }[kind]()


@pytest.mark.parametrize("kind", ["int8", "float8", "intx"])
def test_torchao_weight_only(kind):
    quantize = integration("torchao").quantization.quantize_

    def make(seed):
        model = _tiny(seed)
        quantize(model, _torchao_config(kind))
        assert is_traceable_wrapper_subclass(model.blocks[0].qkv.weight)
        return model

    _roundtrip(make)


def _int8_dit(seed: int = 0) -> TinyDiT:
    model = _tiny(seed)
    integration("torchao").quantization.quantize_(model, _torchao_config("int8"))
    return model


def test_failed_enable_leaves_torchao_inner_tensors_where_they_were(monkeypatch):
    """The last step of enable fails after every block was packed: the inner tensors, which the
    engine had swapped to placeholders, get their data back, and the wrappers stay the same objects."""
    model, reference = _int8_dit(), _int8_dit()
    params = dict(model.named_parameters())
    monkeypatch.setattr(fo.offloader, "attach_state_dict_hooks", lambda *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fo.enable(model, device="cpu")
    assert fo.handle_of(model) is None
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert p is params[name] and _same(p, q), name
    with torch.no_grad():
        assert torch.equal(model(X), reference(X))


def test_mutate_reaches_a_wrappers_inner_tensors():
    """Inside mutate a torchao weight's inner tensors hold real data; a change there is written back."""
    model, reference = _int8_dit(), _int8_dit()
    with torch.no_grad():
        before = reference(X)
    handle = fo.enable(model, device="cpu")
    with handle.mutate(model.blocks[2]):
        model.blocks[2].mlp[0].weight.qdata.neg_()
    reference.blocks[2].mlp[0].weight.qdata.neg_()
    with torch.no_grad():
        expected = reference(X)
        assert not torch.equal(expected, before)
        assert torch.equal(model(X), expected)
    handle.disable()
    assert _same(model.blocks[2].mlp[0].weight, reference.blocks[2].mlp[0].weight)


def test_torchao_submodule_called_outside_its_block():
    """DiT's head calls into block 0: that submodule's torchao weights (their inner tensors) are kept
    resident for those calls, and the output stays exact."""
    from test_outside import HeadReachesIn

    torch.manual_seed(0)
    model = HeadReachesIn().eval()
    integration("torchao").quantization.quantize_(model, _torchao_config("int8"))
    reference = copy.deepcopy(model)
    x, t = torch.randn(2, 5, 8), torch.randn(2, 4)
    emb = list(reference.blocks[0].emb.parameters())
    assert all(is_traceable_wrapper_subclass(p) for p in emb if p.dim() == 2)
    handle = fo.enable(model, device="cpu")
    with torch.no_grad():
        expected = reference(x, t)
        for _ in range(2):
            assert torch.equal(model(x, t), expected)
    assert handle.stats()["outside_resident_bytes"] == sum(u.numel() * u.element_size() for p in emb
                                                           for u in _plain_parts(p))


def test_a_wrappers_inner_bytes_held_elsewhere_are_reported():
    model = _int8_dit()
    kept = model.blocks[1].proj.weight.qdata.view(-1)  # a reference offload cannot free
    handle = fo.enable(model, device="cpu")
    assert handle.stats()["retained_bytes"] == kept.numel() * kept.element_size()


def test_enable_reports_a_wrappers_stored_bytes():
    """The log's MiB and share count a torchao weight's int8 bytes, not its logical float32 size."""
    from fastvideo_offload.blocks import find_block_lists
    from fastvideo_offload.placement import OffloadReport

    model = _int8_dit()
    lists = find_block_lists(model, None)
    offloaded = {id(p) for p in model.blocks.parameters()}
    report = OffloadReport.measure(model, lists, offloaded)

    def stored(params):
        return sum(u.numel() * u.element_size() for p in params for u in _plain_parts(p))

    assert report.lists == [("blocks", 3, stored(model.blocks.parameters()))]
    assert report.total_bytes == stored(model.parameters())
    assert stored(model.blocks.parameters()) < sum(p.numel() for p in model.blocks.parameters()) * 2


def test_loading_another_format_writes_nothing():
    model, reference = _int8_dit(), _int8_dit()
    other = _tiny(1)
    integration("torchao").quantization.quantize_(other, _torchao_config("float8"))
    fo.enable(model, device="cpu")
    with pytest.raises(RuntimeError, match=r"format mismatch for blocks\.0\.qkv\.weight: expected a Int8Tensor, "
                                           r"got a Float8Tensor"):
        model.load_state_dict({"blocks.0.qkv.weight": other.blocks[0].qkv.weight}, strict=False)
    assert _same(model.state_dict()["blocks.0.qkv.weight"], reference.blocks[0].qkv.weight)
    with torch.no_grad():
        assert torch.equal(model(X), reference(X))


def test_wrapper_holding_a_tensor_outside_its_flattening_is_refused():
    model = _int8_dit()
    weight = model.blocks[1].mlp[0].weight
    weight.cached = weight.qdata.float()  # a dequantized copy its forward could read
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp\.0\.weight is a Int8Tensor holding a tensor \(cached\) "
                                         r"outside the inner tensors its __tensor_flatten__ names"):
        fo.enable(model, device="cpu")
    assert fo.handle_of(model) is None
    assert all(u.numel() > 0 for p in model.parameters() for u in _plain_parts(p))


def test_wrapper_on_another_device_than_the_target_is_refused():
    weight = _int8_dit().blocks[0].qkv.weight
    with pytest.raises(ValueError, match=r"w is a Int8Tensor on cpu, and offloading to cuda:0 would leave the tensor "
                                         r"subclass reporting cpu"):
        fo.formats.check([("w", weight)], torch.device("cuda", 0))


def _write_gguf(path, state: dict[str, torch.Tensor]) -> None:
    """A .gguf file as llama.cpp's tools write one: 2-D weights whose rows fit Q8_0 blocks quantized."""
    gguf = integration("gguf")
    writer = gguf.GGUFWriter(str(path), "tinydit")
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, t in state.items():
        if t.dim() == 2 and t.shape[-1] % gguf.GGML_QUANT_SIZES[q8][0] == 0:
            writer.add_tensor(name, gguf.quants.quantize(t.numpy(), q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_gguf(tmp_path, prefetch):
    integration("gguf")
    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    from diffusers.quantizers.gguf.utils import GGUFParameter, _replace_with_gguf_linear

    def make(seed):
        # As diffusers' GGUF quantizer loads a checkpoint: Linear layers with a quantized weight
        # become GGUFLinear, and every tensor is set on its module (GGUF ones as GGUFParameter).
        model = _tiny(seed)
        path = tmp_path / f"tiny-{seed}.gguf"
        _write_gguf(path, model.state_dict())
        state = load_gguf_checkpoint(str(path))
        _replace_with_gguf_linear(model, torch.float32, state)
        for name, value in state.items():
            owner, _, local = name.rpartition(".")
            if not isinstance(value, GGUFParameter):
                value = nn.Parameter(value, requires_grad=False)
            setattr(model.get_submodule(owner), local, value)
        # The block's first parameter is a plain one (norm.weight), as Wan's scale_shift_table is.
        assert not isinstance(next(model.blocks[0].parameters()), GGUFParameter)
        assert isinstance(model.blocks[0].qkv.weight, GGUFParameter)
        return model

    _roundtrip(make, prefetch)


class Fp8Linear(nn.Module):
    """A float8 weight with a per-row scale, dequantized in forward (as fp8 checkpoints are run)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        w = torch.randn(n_out, n_in)
        scale = w.abs().amax(dim=1, keepdim=True) / 448
        self.weight = nn.Parameter((w / scale).to(torch.float8_e4m3fn), requires_grad=False)
        self.scale = nn.Parameter(scale)
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale, self.bias)


class Fp8DiT(nn.Module):
    def __init__(self, dim: int = 32, layers: int = 3):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.blocks = nn.ModuleList(nn.Sequential(Fp8Linear(dim, 2 * dim), nn.GELU(), Fp8Linear(2 * dim, dim))
                                    for _ in range(layers))
        self.head = nn.Linear(dim, 8)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_fp8_with_scale():
    def make(seed):
        torch.manual_seed(seed)
        return Fp8DiT().eval()

    _roundtrip(make)


@pytest.mark.parametrize("layer", ["int8", "nf4"])
def test_bitsandbytes_refused(layer):
    bnb = integration("bitsandbytes")
    model = TinyDiT(dim=32, layers=2)
    if layer == "int8":
        model.blocks[1].proj = bnb.nn.Linear8bitLt(32, 32, has_fp16_weights=False)
    else:
        model.blocks[1].proj = bnb.nn.Linear4bit(32, 32, quant_type="nf4")
    before = {name: (p, p.data, p.detach().clone()) for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"blocks\.1\.proj is a bitsandbytes layer .*cannot be offloaded"):
        fo.enable(model, device="cpu")
    assert fo.handle_of(model) is None
    for name, p in model.named_parameters():
        obj, data, values = before[name]
        assert p is obj and p.data.data_ptr() == data.data_ptr() and torch.equal(p.detach(), values), name


class Repacking(nn.Module):
    """Assigns new data to its weight inside forward, as bitsandbytes' 4-bit layers do on their first call."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, x):
        self.lin.weight.data = self.lin.weight.data.clone()
        return self.lin(x)


def test_forward_replacing_a_weight_is_refused():
    model = TinyDiT(dim=32, layers=3)
    model.blocks[1] = Repacking(32)
    saved = copy.deepcopy(model.state_dict())
    handle = fo.enable(model, device="cpu")
    for _ in range(2):  # the engine stays usable: the next forward is refused the same way
        with pytest.raises(RuntimeError, match=r"block blocks\.1: the forward of offloaded block 1 replaced the "
                                               r"data of its parameter 0 \(Float \[32, 32\]\)"):
            with torch.no_grad():
                model(X)
        assert model.blocks[1].lin.weight.numel() == 0  # the placeholder is back
    handle.disable()
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
