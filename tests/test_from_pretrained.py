"""from_pretrained: a saved model offloaded from its folder in one call, with the weights and dtypes
that diffusers' own from_pretrained gives (checkpoints written by save_pretrained)."""

import pytest
import torch
from safetensors.torch import save_file

import fastvideo_offload as fo
from support.needs import integration
from support.models import TinyDiT, tiny_input

diffusers = integration("diffusers")
integration("accelerate")

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
           text_dim=64, freq_dim=64, ffn_dim=128, num_layers=3, rope_max_seq_len=64)


def wan_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 4, 8, 8, generator=g, dtype=dtype), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 8, 64, generator=g, dtype=dtype))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_diffusers_model_loads_as_diffusers_loads_it(tmp_path, dtype):
    """Every weight bit-identical to diffusers' from_pretrained in that dtype (bf16: the class's fp32
    modules kept fp32), and so is the output; the blocks offloaded, nothing of them resident."""
    torch.manual_seed(0)
    diffusers.WanTransformer3DModel(**WAN).save_pretrained(tmp_path, max_shard_size="200KB")
    kwargs = {} if dtype is None else {"torch_dtype": dtype}
    expected = diffusers.WanTransformer3DModel.from_pretrained(tmp_path, **kwargs).eval()
    for p in expected.parameters():
        # from_pretrained leaves weights at the file's alignments, where a CPU kernel may round
        # otherwise; the offloaded ones sit aligned, as a copy does.
        p.data = p.data.clone()
    model = fo.from_pretrained(diffusers.WanTransformer3DModel, tmp_path, device="cpu", **kwargs)
    assert fo.handle_of(model).stats()["blocks"] == 3
    mine, theirs = model.state_dict(), expected.state_dict()
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert mine[key].dtype == theirs[key].dtype and torch.equal(mine[key], theirs[key]), key
    x = wan_inputs(dtype or torch.float32)
    with torch.no_grad():
        assert torch.equal(model(**x).sample, expected(**x).sample)


def test_a_plain_class_loads_from_its_constructor_arguments(tmp_path):
    torch.manual_seed(0)
    reference = TinyDiT(layers=3).eval()
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))
    model = fo.from_pretrained(TinyDiT, tmp_path, config={"layers": 3}, device="cpu", prefetch=2)
    assert fo.handle_of(model).prefetch == 2
    x = tiny_input()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_bad_calls_name_what_to_pass(tmp_path):
    save_file(TinyDiT(layers=3).state_dict(), str(tmp_path / "model.safetensors"))
    with pytest.raises(TypeError, match="TinyDiT has no from_config/load_config .* pass config="):
        fo.from_pretrained(TinyDiT, tmp_path, device="cpu")
    with pytest.raises(TypeError, match="the checkpoint is `folder`; pass no checkpoint="):
        fo.from_pretrained(TinyDiT, tmp_path, config={"layers": 3}, checkpoint=tmp_path)
    with pytest.raises(TypeError, match="torch_dtype must be a floating-point torch.dtype, got 'bf16'"):
        fo.from_pretrained(TinyDiT, tmp_path, config={"layers": 3}, torch_dtype="bf16")
    with pytest.raises(ValueError, match="is not a folder"):
        fo.from_pretrained(TinyDiT, tmp_path / "model.safetensors", config={"layers": 3})
