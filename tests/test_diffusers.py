"""diffusers' own transformer classes, tiny configs, random weights, CPU: `enable` finds every
block list and the outputs do not change by a bit."""

import copy

import pytest
import torch

import fastvideo_offload as fo
from support.needs import integration
from support.offloaded import enable_and_check

diffusers = integration("diffusers")


def wan():
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=64, ffn_dim=128, num_layers=3, rope_max_seq_len=64,
    )
    inputs = dict(hidden_states=torch.randn(1, 16, 4, 8, 8), timestep=torch.tensor([10]),
                  encoder_hidden_states=torch.randn(1, 8, 64))
    return model, inputs, ["blocks"]


def hunyuan():
    model = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=4, attention_head_dim=16, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        guidance_embeds=False, text_embed_dim=64, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6),
    )
    inputs = dict(hidden_states=torch.randn(1, 16, 4, 8, 8), timestep=torch.tensor([10]),
                  encoder_hidden_states=torch.randn(1, 8, 64),
                  encoder_attention_mask=torch.ones(1, 8, dtype=torch.bool), pooled_projections=torch.randn(1, 32))
    return model, inputs, ["context_embedder.token_refiner.refiner_blocks", "transformer_blocks",
                           "single_transformer_blocks"]


def flux():
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    h = w = 4
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    inputs = dict(hidden_states=torch.randn(1, h * w, 16), encoder_hidden_states=torch.randn(1, 8, 64),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                  img_ids=img_ids.reshape(h * w, 3), txt_ids=torch.zeros(8, 3))
    return model, inputs, ["transformer_blocks", "single_transformer_blocks"]


@pytest.mark.parametrize("make", [wan, hunyuan, flux], ids=["wan", "hunyuan", "flux"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_diffusers_transformer_bit_identical(make, dtype):
    model, inputs, lists = make()
    model = model.to(dtype).eval()
    inputs = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in inputs.items()}
    reference = copy.deepcopy(model)
    handle = fo.enable(model, device="cpu")
    assert handle.block_paths == lists
    n_blocks = sum(len(model.get_submodule(p)) for p in lists)
    assert handle.stats()["blocks"] == n_blocks
    with torch.no_grad():
        for _ in range(3):
            got = model(**inputs, return_dict=False)[0]
            assert torch.equal(got, reference(**inputs, return_dict=False)[0])
    for path in lists:
        for block in model.get_submodule(path):
            assert all(p.numel() == 0 for p in block.parameters())
    assert handle.stats()["enters"] == 3 * n_blocks
    assert handle.stats()["max_materialized_blocks"] == 1
    # diffusers reads the model's device and dtype off its parameters
    assert model.dtype == dtype and model.device.type == "cpu"


def test_diffusers_state_dict_round_trip(tmp_path):
    model, inputs, _ = wan()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    fo.enable(model, device="cpu")
    model.save_pretrained(tmp_path)  # diffusers' own checkpoint writer, under offload
    loaded = diffusers.WanTransformer3DModel.from_pretrained(tmp_path)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_wan22_experts_take_turns():
    """diffusers' Wan2.2 pipelines hold `transformer` and `transformer_2`: enabled in one group,
    the idle expert gives its device slots back when the other one starts."""
    (high, inputs, _), (low, _, _) = wan(), wan()
    reference = [copy.deepcopy(high), copy.deepcopy(low)]
    experts = [high, low]
    handles = [fo.enable(m, device="cpu", group="wan22") for m in experts]
    with torch.no_grad():
        for step in range(6):
            i = 0 if step < 3 else 1
            got = experts[i](**inputs, return_dict=False)[0]
            assert torch.equal(got, reference[i](**inputs, return_dict=False)[0])
            assert handles[1 - i].stats()["device_bytes"] == 0
    assert handles[0].stats()["device_bytes"] == 0
    assert handles[1].stats()["sync_loads"] == 1  # the switch waited for one block's copy, no more


def consisid():
    model = diffusers.ConsisIDTransformer3DModel(
        num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, is_train_face=True, cross_attn_interval=1,
        cross_attn_dim_head=8, cross_attn_num_heads=2, LFE_id_dim=16, LFE_vit_dim=16, LFE_depth=10, LFE_dim_head=8,
        LFE_num_heads=2, LFE_num_id_token=2, LFE_num_querie=4, LFE_output_dim=32, LFE_ff_mult=2, LFE_num_scale=5,
    )
    inputs = dict(hidden_states=torch.randn(1, 2, 4, 8, 8), encoder_hidden_states=torch.randn(1, 8, 16),
                  timestep=torch.tensor([10]), id_cond=torch.randn(1, 16),
                  id_vit_hidden=[torch.randn(1, 6, 16) for _ in range(5)])
    # local_facial_extractor.layers: 10 [attention, feed-forward] ModuleLists, never called themselves
    extractor = [f"local_facial_extractor.layers.{i}.{j}" for i in range(10) for j in range(2)]
    blocks = ([f"transformer_blocks.{i}" for i in range(2)] + extractor
              + [f"perceiver_cross_attention.{i}" for i in range(2)])
    lists = ["transformer_blocks", "local_facial_extractor.layers", "perceiver_cross_attention"]
    return model, inputs, lists, blocks, extractor[-1]


def longcat_audio():
    model = diffusers.LongCatAudioDiTTransformer(dit_dim=16, dit_depth=2, dit_heads=2, dit_text_dim=8, latent_dim=4)
    with torch.no_grad():
        for p in model.parameters():  # the output layers start at zero: the output would not depend on the blocks
            if not p.any():
                p.normal_()
    inputs = dict(hidden_states=torch.randn(1, 6, 4), encoder_hidden_states=torch.randn(1, 5, 8),
                  encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool),
                  timestep=torch.tensor([0.5]))
    # text_conv_layer: an nn.Sequential of four ConvNeXt blocks
    blocks = [f"blocks.{i}" for i in range(2)] + [f"text_conv_layer.{i}" for i in range(4)]
    return model, inputs, ["blocks", "text_conv_layer"], blocks, "text_conv_layer.3"


@pytest.mark.parametrize("make", [consisid, longcat_audio], ids=["consisid", "longcat_audio"])
def test_nested_and_sequential_block_lists_are_found(make):
    model, inputs, lists, blocks, probe = make()
    model.eval()

    def run(m):
        return m(**inputs, return_dict=False)[0]

    # the output depends on the blocks only discovery of nested lists and Sequentials finds
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.get_submodule(probe).parameters()).mul_(2)
        assert not torch.equal(run(changed), run(model))
    handle = enable_and_check(model, blocks, run)
    assert handle.block_paths == lists


def test_naming_consisid_pairs_is_refused():
    model, _, _, _, _ = consisid()
    with pytest.raises(ValueError, match="'local_facial_extractor.layers' .* are ModuleList modules, which are "
                                         "never called"):
        fo.enable(model, device="cpu", blocks=["local_facial_extractor.layers"])
