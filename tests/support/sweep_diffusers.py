"""The compatibility sweep's cases for every transformer class of the installed diffusers
(tests/test_sweep.py): tiny configurations and inputs, the arguments that build a class at full size
where its defaults do not (the real checkpoints' configs), and each class's share of parameter bytes
offloaded at full size."""

import torch

from .sweep_case import Case, flux2_inputs, flux_inputs, minimax_h3_inputs, r, t, video_inputs


def _krea2_inputs(text=4, grid=2):
    position_ids = torch.zeros(text + grid * grid, 3)
    position_ids[text:, 1] = torch.arange(grid).repeat_interleave(grid)
    position_ids[text:, 2] = torch.arange(grid).repeat(grid)
    mask = torch.ones(1, text, dtype=torch.bool)
    mask[:, -1] = False  # a padded text token
    return dict(hidden_states=r(1, grid * grid, 16), encoder_hidden_states=r(1, text, 3, 16), timestep=t(0.5),
                position_ids=position_ids, encoder_attention_mask=mask)


def _ideogram4_inputs(text=4, image=4):
    from diffusers.models.transformers import transformer_ideogram4 as ideogram

    n = text + image
    hidden = torch.zeros(1, n, 16)
    hidden[:, text:] = r(1, image, 16)
    llm = torch.zeros(1, n, 24)
    llm[:, :text] = r(1, text, 24)
    position_ids = torch.zeros(1, n, 3, dtype=torch.long)
    position_ids[:, :text] = torch.arange(text)[:, None]
    position_ids[:, text:] = ideogram.IMAGE_POSITION_OFFSET
    position_ids[:, text:, 1] += t(0, 0, 1, 1)
    position_ids[:, text:, 2] += t(0, 1, 0, 1)
    indicator = torch.full((1, n), ideogram.OUTPUT_IMAGE_INDICATOR)
    indicator[:, :text] = ideogram.LLM_TOKEN_INDICATOR
    return dict(hidden_states=hidden, encoder_hidden_states=llm, timestep=t(0.5), position_ids=position_ids,
                segment_ids=torch.ones(1, n, dtype=torch.long), indicator=indicator)


_WAN_BASE = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True)
_WAN = dict(_WAN_BASE, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)

_DIT = dict(in_channels=4, out_channels=8, num_attention_heads=2, attention_head_dim=8, num_layers=2,
            norm_type="ada_norm_zero", num_embeds_ada_norm=8, patch_size=2, sample_size=8)
_DIT_FULL = dict(in_channels=4, out_channels=8, num_attention_heads=16, attention_head_dim=72, num_layers=28,
                 norm_type="ada_norm_zero", num_embeds_ada_norm=1000, patch_size=2, sample_size=32)


def _dit_inputs():
    return dict(hidden_states=r(2, 4, 8, 8), timestep=t(10, 500), class_labels=t(1, 3))


_SANA_WM_REFINER = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                        cross_attention_dim=16, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2,
                        audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2, caption_channels=16)


def _sana_wm_refiner_inputs():
    # one AR block of 2 latent frames (4x4 tokens each); its RoPE comes from the model's own builder, which reads
    # only the config
    from diffusers import SanaWMLTX2RefinerTransformer3DModel

    rope = SanaWMLTX2RefinerTransformer3DModel(**_SANA_WM_REFINER).build_rotary_emb_for_absolute_positions(
        1, [0, 1], 4, 4, torch.device("cpu"), 24.0)
    return dict(hidden_states=r(1, 32, 8), encoder_hidden_states=r(1, 6, 16), timestep=torch.full((1, 32), 500.0),
                video_rotary_emb=rope)


def _qwenimage21_inputs():
    # 6 text tokens around one image slot (a 2x2 condition image), then the target image's 4 slots (4x4 tokens):
    # each slot stands for 2x2 latent tokens
    img_mask = torch.zeros(1, 7 + 4, dtype=torch.bool)
    img_mask[0, 3] = img_mask[0, 7:] = True
    return dict(hidden_states=r(1, 4 + 16, 16), encoder_hidden_states=r(1, 7, 16), timestep=t(0.5),
                img_shapes=[[(1, 2, 2), (1, 4, 4)]], img_mask=img_mask)


def _wan_animate2_inputs():
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    return dict(hidden_states=[r(4, 1, 8, 8)], timestep=t(500), encoder_hidden_states=[r(6, 16)],
                condition_latents=[r(4, 1, 8, 8)], kv_cache=WanAnimate2KVCache(2), kv_cache_mode="extract",
                seq_len=16, offset_grid_sizes=torch.tensor([[1, 4, 4]]))


DIFFUSERS: dict[str, Case] = {
    "AceStepTransformer1DModel": Case(
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2, sliding_window=16),
        lambda: dict(hidden_states=r(1, 8, 8), timestep=t(0.5), timestep_r=t(0.25),
                     encoder_hidden_states=r(1, 10, 32), context_latents=r(1, 8, 16))),
    "AllegroTransformer3DModel": Case(
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2,
             cross_attention_dim=16, sample_width=8, sample_height=8, sample_frames=8, caption_channels=8),
        lambda: video_inputs(text=8)),
    "AnyFlowTransformer3DModel": Case(
        dict(_WAN_BASE, gate_value=0.25, deltatime_type="r"),
        lambda: dict(hidden_states=r(1, 2, 4, 8, 8), timestep=torch.full((1, 2), 500.0),
                     r_timestep=torch.full((1, 2), 250.0), encoder_hidden_states=r(1, 8, 16))),
    "AnyFlowFARTransformer3DModel": Case(
        dict(_WAN_BASE, compressed_patch_size=(1, 4, 4), full_chunk_limit=3, gate_value=0.25, deltatime_type="r"),
        lambda: dict(hidden_states=r(1, 4, 4, 16, 16), timestep=torch.full((1, 4), 500.0),
                     r_timestep=torch.full((1, 4), 250.0), encoder_hidden_states=r(1, 8, 16),
                     chunk_partition=[2, 2])),
    "AuraFlowTransformer2DModel": Case(
        dict(sample_size=16, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=2,
             attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
             out_channels=4, pos_embed_max_size=64),
        lambda: dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 8, 16), timestep=t(500))),
    "BriaTransformer2DModel": Case(
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=None, axes_dims_rope=[0, 4, 4]),
        lambda: flux_inputs()),
    "BriaFiboTransformer2DModel": Case(
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8,
             num_attention_heads=2, joint_attention_dim=32, text_encoder_dim=16, pooled_projection_dim=None,
             axes_dims_rope=[0, 4, 4]),
        lambda: dict(flux_inputs(), text_encoder_layers=[r(1, 8, 16) for _ in range(3)])),
    "ChromaTransformer2DModel": Case(
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=[4, 4, 8], approximator_num_channels=8,
             approximator_hidden_dim=16, approximator_layers=2),
        lambda: flux_inputs()),
    "ChronoEditTransformer3DModel": Case(dict(_WAN, rope_temporal_skip_len=8), lambda: video_inputs()),
    "CogVideoXTransformer3DModel": Case(
        dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
             text_embed_dim=8, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
             temporal_compression_ratio=4, max_text_seq_length=8),
        lambda: dict(hidden_states=r(1, 1, 4, 8, 8), encoder_hidden_states=r(1, 8, 8), timestep=t(500))),
    "CogView3PlusTransformer2DModel": Case(
        dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
             out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=2, pos_embed_max_size=8,
             sample_size=8),
        lambda: dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 8, 8), timestep=t(500),
                     original_size=t([64, 64]), target_size=t([64, 64]), crop_coords=t([0, 0]))),
    "CogView4Transformer2DModel": Case(
        dict(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4,
             out_channels=4, text_embed_dim=8, time_embed_dim=8, condition_dim=4),
        lambda: dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 8, 8), timestep=t(500),
                     original_size=t([64, 64]), target_size=t([64, 64]), crop_coords=t([0, 0]))),
    "ConsisIDTransformer3DModel": Case(
        dict(num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
             text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=8, patch_size=2,
             temporal_compression_ratio=4, max_text_seq_length=8, is_train_face=True, cross_attn_interval=1,
             cross_attn_dim_head=8, cross_attn_num_heads=2, LFE_id_dim=16, LFE_vit_dim=16, LFE_depth=5,
             LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=2, LFE_num_querie=4, LFE_output_dim=32,
             LFE_ff_mult=2, LFE_num_scale=5),
        lambda: dict(hidden_states=r(1, 2, 4, 8, 8), encoder_hidden_states=r(1, 8, 16), timestep=t(500),
                     id_cond=r(1, 16), id_vit_hidden=[r(1, 6, 16) for _ in range(5)])),
    "CosmosTransformer3DModel": Case(
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
             text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2),
             rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=True, extra_pos_embed_type="learnable"),
        lambda: dict(hidden_states=r(1, 4, 1, 8, 8), timestep=t(500), encoder_hidden_states=r(1, 8, 16),
                     attention_mask=torch.ones(1, 8), fps=30, padding_mask=torch.zeros(1, 1, 8, 8))),
    "DiTTransformer2DModel": Case(_DIT, _dit_inputs, full=_DIT_FULL),
    "Transformer2DModel": Case(_DIT, _dit_inputs, full=_DIT_FULL),
    "EasyAnimateTransformer3DModel": Case(
        dict(attention_head_dim=16, num_attention_heads=2, in_channels=4, mmdit_layers=2, num_layers=2,
             out_channels=4, patch_size=2, sample_height=60, sample_width=90, text_embed_dim=16, time_embed_dim=8,
             time_position_encoding_type="3d_rope", timestep_activation_fn="silu"),
        lambda: video_inputs(),
        full=dict(attention_head_dim=64, num_attention_heads=48, in_channels=16, out_channels=16, num_layers=48,
                  mmdit_layers=48, patch_size=2, sample_height=128, sample_width=128, text_embed_dim=3584,
                  time_embed_dim=512, time_position_encoding_type="3d_rope", timestep_activation_fn="silu")),
    "ErnieImageTransformer2DModel": Case(
        dict(hidden_size=16, num_attention_heads=1, num_layers=2, ffn_hidden_size=16, in_channels=8, out_channels=8,
             patch_size=1, text_in_dim=16, rope_theta=256, rope_axes_dim=(8, 4, 4), qk_layernorm=True),
        lambda: dict(hidden_states=r(1, 8, 4, 4), timestep=t(1.0), text_bth=r(1, 8, 16), text_lens=t(8))),
    "FluxTransformer2DModel": Case(
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
        lambda: flux_inputs(pooled=32)),
    "Flux2Transformer2DModel": Case(
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256,
             axes_dims_rope=[4, 4, 4, 4]),
        flux2_inputs),
    "GlmImageTransformer2DModel": Case(
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             text_embed_dim=32, time_embed_dim=16, condition_dim=8, prior_vq_quantizer_codebook_size=64),
        lambda: dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 8, 32), prior_token_id=t(3),
                     prior_token_drop=torch.zeros(1, dtype=torch.bool), timestep=t(500),
                     target_size=torch.tensor([[8.0, 8.0]]), crop_coords=torch.tensor([[0.0, 0.0]]))),
    "HeliosTransformer3DModel": Case(
        dict(_WAN_BASE, qk_norm="rms_norm_across_heads", rope_dim=(4, 4, 4), has_multi_term_memory_patch=True,
             guidance_cross_attn=True, zero_history_timestep=True, is_amplify_history=False),
        lambda: video_inputs(indices_hidden_states=torch.ones(1, 2), indices_latents_history_short=torch.ones(1, 1),
                       indices_latents_history_mid=torch.ones(1, 1), indices_latents_history_long=torch.ones(1, 4),
                       latents_history_short=r(1, 4, 1, 8, 8), latents_history_mid=r(1, 4, 1, 8, 8),
                       latents_history_long=r(1, 4, 4, 8, 8))),
    "HiDreamImageTransformer2DModel": Case(
        dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8,
             num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
             num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1),
             force_inference_output=True),
        lambda: dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states_t5=r(1, 8, 8),
                     encoder_hidden_states_llama3=r(2, 1, 8, 4), pooled_embeds=r(1, 8), timesteps=t(500)),
        full=dict(patch_size=2, in_channels=16, out_channels=16, num_layers=16, num_single_layers=32,
                  attention_head_dim=128, num_attention_heads=20, caption_channels=[4096, 4096], text_emb_dim=2048,
                  num_routed_experts=4, num_activated_experts=2, axes_dims_rope=(64, 32, 32),
                  max_resolution=(128, 128), llama_layers=list(range(48)))),
    "HunyuanDiT2DModel": Case(
        dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16, text_len=4,
             text_len_t5=4),
        lambda: dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 4, 8),
                     text_embedding_mask=torch.ones(1, 4), encoder_hidden_states_t5=r(1, 4, 8),
                     text_embedding_mask_t5=torch.ones(1, 4), timestep=t(500.0),
                     image_meta_size=torch.tensor([[1024.0, 1024, 16, 16, 0, 0]]), style=torch.zeros(1, dtype=int),
                     image_rotary_emb=[torch.ones(16, 8), torch.zeros(16, 8)]),
        full=dict(in_channels=4, patch_size=2, sample_size=128, hidden_size=1408, num_layers=40,
                  num_attention_heads=16, attention_head_dim=88)),
    "HunyuanVideoTransformer3DModel": Case(
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
             num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
             text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)),
        lambda: dict(hidden_states=r(1, 4, 1, 8, 8), timestep=t(500.0), encoder_hidden_states=r(1, 8, 16),
                     pooled_projections=r(1, 8), encoder_attention_mask=torch.ones(1, 8), guidance=t(500.0))),
    "HunyuanVideoFramepackTransformer3DModel": Case(
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
             num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
             text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), has_image_proj=True,
             image_proj_dim=16, has_clean_x_embedder=True),
        lambda: dict(hidden_states=r(1, 4, 3, 4, 4), timestep=t(500), encoder_hidden_states=r(1, 8, 16),
                     pooled_projections=r(1, 8), encoder_attention_mask=torch.ones(1, 8), guidance=t(500),
                     image_embeds=r(1, 8, 16), indices_latents=torch.ones(3), latents_clean=r(1, 4, 2, 4, 4),
                     indices_latents_clean=torch.ones(2), latents_history_2x=r(1, 4, 2, 4, 4),
                     indices_latents_history_2x=torch.ones(2), latents_history_4x=r(1, 4, 8, 4, 4),
                     indices_latents_history_4x=torch.ones(8))),
    "HunyuanVideo15Transformer3DModel": Case(
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
             num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16,
             text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v"),
        lambda: dict(hidden_states=r(1, 4, 1, 8, 8), timestep=t(1.0), encoder_hidden_states=r(1, 6, 16),
                     encoder_hidden_states_2=r(1, 4, 8), encoder_attention_mask=torch.ones(1, 6),
                     encoder_attention_mask_2=torch.ones(1, 4), image_embeds=torch.zeros(1, 3, 12))),
    "HunyuanImageTransformer2DModel": Case(
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
             num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=(1, 1), text_embed_dim=16,
             rope_axes_dim=(4, 4)),
        lambda: dict(hidden_states=r(1, 4, 8, 8), timestep=t(500.0), encoder_hidden_states=r(1, 8, 16),
                     encoder_attention_mask=torch.ones(1, 8))),
    "JoyImageEditTransformer3DModel": Case(
        dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=2,
             rope_dim_list=[4, 6, 6], theta=256),
        lambda: dict(hidden_states=r(1, 16, 1, 4, 4), encoder_hidden_states=r(1, 8, 16), timestep=t(1.0))),
    "JoyImageEditPlusTransformer3DModel": Case(
        dict(patch_size=[1, 2, 2], in_channels=16, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=2,
             rope_dim_list=[4, 6, 6], theta=256),
        lambda: dict(hidden_states=r(1, 2, 16, 1, 2, 2), encoder_hidden_states=r(1, 8, 16), timestep=t(1.0),
                     shape_list=[[(1, 1, 1), (1, 1, 1)]])),
    "LatteTransformer3DModel": Case(
        dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4, num_attention_heads=2,
             caption_channels=8, in_channels=4, cross_attention_dim=8, out_channels=8, num_embeds_ada_norm=1000,
             norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6),
        lambda: video_inputs(f=1, text=8, enable_temporal_attentions=True),
        full=dict(sample_size=64, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16,
                  caption_channels=4096, in_channels=4, cross_attention_dim=1152, out_channels=8,
                  num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                  norm_eps=1e-6)),
    "LongCatAudioDiTTransformer": Case(
        dict(dit_dim=16, dit_depth=2, dit_heads=2, dit_text_dim=8, latent_dim=4),
        lambda: dict(hidden_states=r(1, 6, 4), encoder_hidden_states=r(1, 5, 8),
                     encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool), timestep=t(0.5))),
    "LongCatImageTransformer2DModel": Case(
        dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
        lambda: flux_inputs(guidance=True)),
    "LTXVideoTransformer3DModel": Case(
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
             num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16),
        lambda: dict(hidden_states=r(1, 2 * 8 * 8, 4), encoder_hidden_states=r(1, 8, 16), timestep=t(500),
                     encoder_attention_mask=torch.ones(1, 8).bool(), num_frames=2, height=8, width=8)),
    "LTX2VideoTransformer3DModel": Case(
        dict(in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
             cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
             audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
             caption_channels=16, rope_double_precision=False),
        lambda: dict(hidden_states=r(1, 2 * 8 * 8, 4), audio_hidden_states=r(1, 9, 4),
                     encoder_hidden_states=r(1, 8, 16), audio_encoder_hidden_states=r(1, 8, 16), timestep=t(500.0),
                     encoder_attention_mask=torch.ones(1, 8).bool(), num_frames=2, height=8, width=8,
                     audio_num_frames=9, fps=25.0)),
    "LuminaNextDiT2DModel": Case(
        dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_attention_heads=3,
             num_kv_heads=1, multiple_of=16, learn_sigma=False, qk_norm=True, cross_attention_dim=32),
        lambda: dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 8, 32), timestep=t(0.5),
                     encoder_mask=torch.ones(1, 8), image_rotary_emb=r(384, 384, 4),
                     cross_attention_kwargs={}),
        full=dict(sample_size=128, patch_size=2, in_channels=4, hidden_size=2304, num_layers=24,
                  num_attention_heads=32, num_kv_heads=8, learn_sigma=True, qk_norm=True, cross_attention_dim=2048)),
    "Lumina2Transformer2DModel": Case(
        dict(sample_size=16, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
             num_attention_heads=3, num_kv_heads=1, multiple_of=2, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128),
             cap_feat_dim=32),
        lambda: dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 8, 32), timestep=t(0.5),
                     encoder_attention_mask=torch.ones(1, 8, dtype=torch.bool))),
    "MiniMaxMusic3Transformer1DModel": Case(
        dict(in_channels=8, condition_dim=16, num_layers=2, num_attention_heads=2, attention_head_dim=8,
             ff_inner_dim=32, rotary_dim=4, fourier_embedding_dim=8),
        lambda: dict(hidden_states=r(1, 8, 12), encoder_hidden_states=r(1, 12, 16), timestep=t(0.5))),
    "MochiTransformer3DModel": Case(
        dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
             in_channels=4, out_channels=None, qk_norm="rms_norm", text_embed_dim=16, time_embed_dim=4,
             activation_fn="swiglu", max_sequence_length=16),
        lambda: video_inputs(encoder_attention_mask=torch.ones(1, 8, dtype=torch.bool))),
    "MotifVideoTransformer3DModel": Case(
        dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
             num_single_layers=2, num_decoder_layers=0, patch_size=1, patch_size_t=1, qk_norm="rms_norm",
             norm_type="layer_norm", text_embed_dim=32, image_embed_dim=4, rope_theta=256.0, rope_axes_dim=(4, 4, 4),
             enable_text_cross_attention_dual=False, enable_text_cross_attention_single=False),
        lambda: video_inputs(c=9, f=3, h=4, w=4, text=32)),
    "NucleusMoEImageTransformer2DModel": Case(
        dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
             joint_attention_dim=16, axes_dims_rope=(8, 4, 4), moe_enabled=False, capacity_factors=[8.0, 8.0]),
        lambda: dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 8, 16),
                     encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long), timestep=t(1.0),
                     img_shapes=[(1, 4, 4)])),
    "OmniGenTransformer2DModel": Case(
        dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_layers=2,
             pad_token_id=0, vocab_size=100, in_channels=4, time_step_dim=4,
             rope_scaling={"long_factor": [1, 2], "short_factor": [1, 2]}),
        lambda: dict(hidden_states=r(1, 4, 8, 8), timestep=t(0.5), input_ids=torch.randint(0, 10, (1, 24)),
                     input_img_latents=[r(1, 4, 8, 8)], input_image_sizes={0: [[0, 16]]},
                     attention_mask=torch.ones(1, 41, 41), position_ids=torch.arange(41)[None]),
        full=dict(hidden_size=3072, num_attention_heads=32, num_key_value_heads=32, intermediate_size=8192,
                  num_layers=32, pad_token_id=32000, vocab_size=32064, in_channels=4, time_step_dim=256,
                  rope_scaling={"long_factor": [1.0] * 48, "short_factor": [1.0] * 48, "type": "su"})),
    "OvisImageTransformer2DModel": Case(
        dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8)),
        lambda: flux_inputs()),
    "PixArtTransformer2DModel": Case(
        dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=4, num_attention_heads=2, in_channels=4,
             cross_attention_dim=8, out_channels=8, num_embeds_ada_norm=8, norm_type="ada_norm_single",
             norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False, caption_channels=None),
        lambda: dict(hidden_states=r(1, 4, 8, 8), timestep=t(500), encoder_hidden_states=r(1, 8, 8),
                     added_cond_kwargs={"aspect_ratio": None, "resolution": None})),
    "PriorTransformer": Case(
        dict(num_attention_heads=2, attention_head_dim=4, num_layers=2, embedding_dim=8, num_embeddings=7,
             additional_embeddings=4),
        lambda: dict(hidden_states=r(1, 8), timestep=2, proj_embedding=r(1, 8), encoder_hidden_states=r(1, 7, 8))),
    "PRXTransformer2DModel": Case(
        dict(in_channels=4, patch_size=2, context_in_dim=16, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
             axes_dim=[8, 8]),
        lambda: dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 8, 16), timestep=t(1.0))),
    "QwenImageTransformer2DModel": Case(
        dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
             joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)),
        lambda: dict(hidden_states=r(1, 16, 16), encoder_hidden_states=r(1, 8, 16),
                     encoder_hidden_states_mask=torch.ones(1, 8, dtype=torch.long), timestep=t(1.0),
                     img_shapes=[(1, 4, 4)])),
    "SanaTransformer2DModel": Case(
        dict(patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
             num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
             sample_size=8),
        lambda: dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 8, 8), timestep=t(500))),
    "SanaVideoTransformer3DModel": Case(
        dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
             num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
             mlp_ratio=2.5, sample_size=8, patch_size=(1, 2, 2), norm_elementwise_affine=False,
             qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
        lambda: video_inputs()),
    "SD3Transformer2DModel": Case(
        dict(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
             caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=32, out_channels=4,
             pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm"),
        lambda: dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 8, 16), pooled_projections=r(1, 32),
                     timestep=t(500))),
    "SkyReelsV2Transformer3DModel": Case(_WAN, lambda: video_inputs()),
    "StableAudioDiTModel": Case(
        dict(sample_size=8, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
             num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=8, time_proj_dim=8,
             global_states_input_dim=8, cross_attention_input_dim=8),
        lambda: dict(hidden_states=r(1, 4, 8), timestep=t(500), encoder_hidden_states=r(1, 6, 8),
                     global_hidden_states=r(1, 1, 8), rotary_embedding=(r(9, 2), r(9, 2)))),
    "TransformerTemporalModel": Case(
        dict(num_attention_heads=2, attention_head_dim=4, in_channels=4, num_layers=2, norm_num_groups=1),
        lambda: dict(hidden_states=r(2, 4, 4, 4), num_frames=2),
        full=dict(num_attention_heads=8, attention_head_dim=40, in_channels=320, num_layers=1, norm_num_groups=32)),
    "WanTransformer3DModel": Case(_WAN, lambda: video_inputs()),
    "WanVACETransformer3DModel": Case(
        dict(_WAN, num_layers=4, vace_layers=[0, 2], vace_in_channels=12),
        lambda: video_inputs(control_hidden_states=r(1, 12, 2, 8, 8))),
    "WanAnimateTransformer3DModel": Case(
        dict(_WAN, in_channels=12, latent_channels=4, image_dim=16,
             motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16}, motion_encoder_size=16, motion_style_dim=8,
             motion_dim=4, motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
             inject_face_latents_blocks=2),
        lambda: dict(hidden_states=r(1, 12, 5, 8, 8), timestep=t(500), encoder_hidden_states=r(1, 8, 16),
                     encoder_hidden_states_image=r(1, 4, 16), pose_hidden_states=r(1, 4, 4, 8, 8),
                     face_pixel_values=r(1, 3, 13, 16, 16))),
    "ZImageTransformer2DModel": Case(
        dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=16, n_layers=2, n_refiner_layers=1,
             n_heads=1, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, axes_dims=[8, 4, 4],
             axes_lens=[256, 32, 32]),
        lambda: dict(x=[r(4, 1, 8, 8)], cap_feats=[r(8, 16)], t=t(0.5))),
    "BriaFibo2Transformer2DModel": Case(  # text features: the Perceiver's bundle, then one per injection layer
        dict(in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=16,
             injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8,
             gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(8, 4, 4), axes_lens=(64, 32, 32)),
        lambda: dict(hidden_states=r(1, 4, 8, 8), timestep=t(0.5), encoder_hidden_states=r(1, 2, 6, 16))),
    "Cosmos3OmniTransformer": Case(
        dict(head_dim=6, hidden_act="relu2", hidden_size=12, intermediate_size=24, latent_channel=2,
             latent_patch_size=1, num_attention_heads=2, num_hidden_layers=2, num_key_value_heads=1,
             patch_latent_dim=2, qk_norm_for_text=False, rope_axes_dim=[1, 1, 1], rope_theta=1e8, vocab_size=32),
        lambda: dict(input_ids=t(1, 2), text_indexes=t(0, 1), position_ids=torch.zeros(3, 6, dtype=torch.long),
                     und_len=2, sequence_length=6, vision_tokens=[r(1, 2, 1, 2, 2)], vision_token_shapes=[(1, 2, 2)],
                     vision_sequence_indexes=torch.arange(2, 6), vision_mse_loss_indexes=torch.arange(2, 6),
                     vision_timesteps=torch.ones(4), vision_noisy_frame_indexes=[t(0)])),
    "Flux3Transformer2DModel": Case(
        dict(in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 4, 4)),
        lambda: {k: v[0] if k.endswith("_ids") else v for k, v in flux2_inputs().items() if k != "guidance"}),
    "Ideogram4Transformer2DModel": Case(
        dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, intermediate_size=32,
             adaln_dim=16, llm_features_dim=24, rope_theta=10_000, mrope_section=(2, 1, 1)),
        lambda: _ideogram4_inputs()),
    "Kandinsky5Transformer3DModel": Case(
        dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, model_dim=32,
             ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6)),
        lambda: dict(hidden_states=r(1, 2, 8, 8, 4), encoder_hidden_states=r(1, 8, 16), timestep=t(500.0),
                     pooled_projections=r(1, 8), visual_rope_pos=[torch.arange(2), torch.arange(4), torch.arange(4)],
                     text_rope_pos=torch.arange(8))),
    "Kandinsky6SRTransformer3DModel": Case(
        dict(in_visual_dim=4, out_visual_dim=4, time_dim=16, model_dim=32, ff_dim=64, num_visual_blocks=2,
             axes_dims=(4, 6, 6)),
        lambda: dict(hidden_states=r(1, 2, 8, 8, 9), timestep=t(500.0))),  # latents, condition, anchor mask
    "Kandinsky6Transformer3DModel": Case(
        dict(in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, model_dim=32,
             ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False),
        lambda: dict(hidden_states=r(1, 2, 8, 8, 4), encoder_hidden_states=r(1, 8, 16), pooled_projections=r(1, 8),
                     timestep=t(500.0))),
    "Krea2Transformer2DModel": Case(
        dict(in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3,
             text_num_attention_heads=2, text_num_key_value_heads=1, text_intermediate_size=16,
             num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 2, 2), rope_theta=1000.0),
        lambda: _krea2_inputs()),
    "MiniMaxH3Transformer3DModel": Case(
        dict(num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2, num_refiner_layers=1,
             ffn_dim=32, in_channels=4, audio_in_channels=6, patch_size=(1, 2, 2), text_dim=8, freq_dim=8,
             time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2),
        lambda: minimax_h3_inputs()),
    "MiniMaxMusic3RVQDepthDecoder": Case(
        dict(hidden_size=32, num_layers=2, num_attention_heads=2, intermediate_size=64, audio_vocab_size=16,
             num_codebooks=4, max_position_embeddings=8),
        lambda: dict(inputs_embeds=r(1, 4, 32))),
    "QwenImage21Transformer2DModel": Case(
        dict(in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
             context_in_dim=16, axes_dims_rope=(4, 6, 6)),
        _qwenimage21_inputs),
    "RFD4ProteinaTransformer": Case(  # a protein of 6 tokens; a few of its many input features
        dict(nlayers=2, token_dim=32, nheads=2, dim_cond=16, pair_repr_dim=16, latent_dim=4, token_type_emb_dim=4,
             cath_emb_dim=4, t_emb_dim=16, seq_sep_dim=8, xt_pair_dist_dim=8,
             feats_seq=("xt_bb_ca", "xt_local_latents", "token_type"),
             feats_cond_seq=("time_emb_bb_ca", "time_emb_local_latents"), feats_pair_repr=("xt_bb_ca_pair_dists",),
             update_pair_repr_every_n=1, tri_mult_c=8, num_sequence_classes=8),
        lambda: dict(bb_ca=r(1, 6, 3), local_latents=r(1, 6, 4), bb_ca_time=t(0.5), local_latents_time=t(0.5),
                     padding_mask=torch.ones(1, 6, dtype=torch.bool), token_type=t(0, 0, 1, 1, 2, 2)[None],
                     conditioning=dict(is_in_context_conditioning=torch.zeros(1, 6, dtype=torch.bool),
                                       supports_local_latent=torch.ones(1, 6, dtype=torch.bool)))),
    "SanaWMLTX2RefinerTransformer3DModel": Case(_SANA_WM_REFINER, _sana_wm_refiner_inputs),
    "SanaWMTransformer3DModel": Case(
        dict(in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, softmax_every_n=2, linear_head_dim=16,
             chunk_plucker_channels=6, chunk_plucker_post_attn_blocks=2, caption_channels=16, image_size=64,
             mixed_precision="fp32"),
        lambda: dict(hidden_states=r(1, 4, 2, 8, 8), timestep=torch.full((1, 1, 2), 500.0),
                     encoder_hidden_states=r(1, 1, 6, 16), encoder_attention_mask=torch.ones(1, 6),
                     camera_conditions=r(1, 2, 20), chunk_plucker=r(1, 6, 2, 8, 8))),
    "StableAudio3DiTModel": Case(
        dict(io_channels=8, embed_dim=32, depth=2, num_heads=4, cond_token_dim=16, global_cond_dim=12,
             local_add_cond_dim=5, timestep_features_dim=16, ff_mult=2, num_memory_tokens=3,
             use_differential_attention=False),
        lambda: dict(hidden_states=r(1, 8, 16), timestep=t(0.5), encoder_hidden_states=r(1, 4, 16),
                     global_hidden_states=r(1, 12))),
    "T5FilmDecoder": Case(
        dict(input_dims=8, targets_length=6, d_model=16, num_layers=2, num_heads=2, d_kv=8, d_ff=32),
        lambda: dict(encodings_and_masks=[(r(1, 5, 16), torch.ones(1, 5, dtype=torch.bool))],
                     decoder_input_tokens=r(1, 6, 8), decoder_noise_time=t(0.5))),
    "WanAnimate2Transformer3DModel": Case(  # its reference pass, which fills its KV cache
        dict(text_len=8, in_dim=8, dim=24, ffn_dim=32, freq_dim=32, text_dim=16, out_dim=4, num_heads=2, num_layers=2,
             use_img_emb=False),
        _wan_animate2_inputs),
    "DreamLiteTransformer2DModel": Case(
        dict(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=2, cross_attention_dim=16),
        lambda: dict(hidden_states=r(1, 32, 4, 4), encoder_hidden_states=r(1, 8, 16)),
        full=dict(in_channels=16 * 88)),  # its defaults, channels = heads x dim
}

#: The share of parameter bytes offloaded at full size (tests/test_sweep.py checks it, docs/compatibility.md lists it).
FULL_SIZE_SHARE: dict[str, float] = {
    "AceStepTransformer1DModel": 0.959,
    "AllegroTransformer3DModel": 0.981,
    "AnyFlowFARTransformer3DModel": 0.982,
    "AnyFlowTransformer3DModel": 0.982,
    "AuraFlowTransformer2DModel": 0.994,
    "BriaFibo2Transformer2DModel": 0.999,
    "BriaFiboTransformer2DModel": 0.997,
    "BriaTransformer2DModel": 0.996,
    "ChromaTransformer2DModel": 0.997,
    "ChronoEditTransformer3DModel": 0.984,
    "CogVideoXTransformer3DModel": 0.993,
    "CogView3PlusTransformer2DModel": 0.994,
    "CogView4Transformer2DModel": 0.994,
    "ConsisIDTransformer3DModel": 0.993,
    "Cosmos3OmniTransformer": 0.917,
    "CosmosTransformer3DModel": 0.99,
    "DiTTransformer2DModel": 0.996,
    "DreamLiteTransformer2DModel": 0.889,
    "EasyAnimateTransformer3DModel": 0.999,
    "ErnieImageTransformer2DModel": 0.963,
    "Flux2Transformer2DModel": 0.975,
    "Flux3Transformer2DModel": 0.953,
    "FluxTransformer2DModel": 0.995,
    "GlmImageTransformer2DModel": 0.976,
    "HeliosTransformer3DModel": 0.982,
    "HiDreamImageTransformer2DModel": 0.998,
    "HunyuanDiT2DModel": 0.947,
    "HunyuanImageTransformer2DModel": 0.995,
    "HunyuanVideo15Transformer3DModel": 0.994,
    "HunyuanVideoFramepackTransformer3DModel": 0.992,
    "HunyuanVideoTransformer3DModel": 0.992,
    "Ideogram4Transformer2DModel": 0.968,
    "JoyImageEditPlusTransformer3DModel": 0.981,
    "JoyImageEditTransformer3DModel": 0.981,
    "Kandinsky5Transformer3DModel": 0.995,
    "Kandinsky6SRTransformer3DModel": 0.997,
    "Kandinsky6Transformer3DModel": 0.999,
    "Krea2Transformer2DModel": 0.975,
    "LTX2VideoTransformer3DModel": 0.982,
    "LTXVideoTransformer3DModel": 0.978,
    "LatteTransformer3DModel": 0.988,
    "LongCatAudioDiTTransformer": 0.962,
    "LongCatImageTransformer2DModel": 0.997,
    "Lumina2Transformer2DModel": 0.998,
    "LuminaNextDiT2DModel": 0.997,
    "MiniMaxH3Transformer3DModel": 0.998,
    "MiniMaxMusic3RVQDepthDecoder": 0.883,
    "MiniMaxMusic3Transformer1DModel": 0.994,
    "MochiTransformer3DModel": 0.99,
    "MotifVideoTransformer3DModel": 0.996,
    "NucleusMoEImageTransformer2DModel": 0.998,
    "OmniGenTransformer2DModel": 0.963,
    "OvisImageTransformer2DModel": 0.995,
    "PRXTransformer2DModel": 0.988,
    "PixArtTransformer2DModel": 0.983,
    "PriorTransformer": 0.985,
    "QwenImage21Transformer2DModel": 0.981,
    "QwenImageTransformer2DModel": 0.998,
    "RFD4ProteinaTransformer": 0.88,
    "SD3Transformer2DModel": 0.985,
    "SanaTransformer2DModel": 0.971,
    "SanaVideoTransformer3DModel": 0.976,
    "SanaWMLTX2RefinerTransformer3DModel": 0.982,
    "SanaWMTransformer3DModel": 0.982,
    "SkyReelsV2Transformer3DModel": 0.98,
    "StableAudio3DiTModel": 0.981,
    "StableAudioDiTModel": 0.992,
    "T5FilmDecoder": 0.949,
    "Transformer2DModel": 0.997,
    "TransformerTemporalModel": 0.909,
    "WanAnimate2Transformer3DModel": 0.985,
    "WanAnimateTransformer3DModel": 0.983,
    "WanTransformer3DModel": 0.984,
    "WanVACETransformer3DModel": 0.986,
    "ZImageTransformer2DModel": 0.998,
}
