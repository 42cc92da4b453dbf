"""The compatibility sweep's cases for every DiT of the installed FastVideo
(tests/test_sweep_fastvideo.py): where each class and its full-size config live, each one's share of
parameter bytes offloaded at full size, and tiny configurations with inputs."""

import torch

from .sweep_case import Case, flux2_inputs, flux_inputs, minimax_h3_inputs, r, t, video_inputs


#: FastVideo's DiTs: the class in fastvideo.models.dits.<module> and its config in
#: fastvideo.configs.models.dits.<module>, whose defaults are the full-size model.
FASTVIDEO: dict[str, tuple[str, str]] = {
    "CausalWanTransformer3DModel": ("causal_wanvideo", "wanvideo.WanVideoConfig"),
    "CosmosTransformer3DModel": ("cosmos", "cosmos.CosmosVideoConfig"),
    "Cosmos25Transformer3DModel": ("cosmos2_5", "cosmos2_5.Cosmos25VideoConfig"),
    "DreamXWorldTransformer3DModel": ("dreamx_world", "dreamx_world.DreamXWorldConfig"),
    "DreamXWorldARTransformer3DModel": ("dreamx_world_ar", "dreamx_world.DreamXWorldARConfig"),
    "FluxTransformer2DModel": ("flux", "flux.FluxDiTConfig"),
    "Flux2Transformer2DModel": ("flux_2", "flux_2.Flux2Config"),
    "Gen3CTransformer3DModel": ("gen3c", "gen3c.Gen3CVideoConfig"),
    "GlmImageTransformer2DModel": ("glm_image", "glm_image.GlmImageDiTConfig"),
    "HunyuanGameCraftTransformer3DModel": ("hunyuangamecraft", "hunyuangamecraft.HunyuanGameCraftConfig"),
    "HunyuanVideoTransformer3DModel": ("hunyuanvideo", "hunyuanvideo.HunyuanVideoConfig"),
    "HunyuanVideo15Transformer3DModel": ("hunyuanvideo15", "hunyuanvideo15.HunyuanVideo15Config"),
    "HYWorldTransformer3DModel": ("hyworld.hyworld", "hyworld.HYWorldConfig"),
    "Kandinsky5Transformer3DModel": ("kandinsky5", "kandinsky5.Kandinsky5VideoConfig"),
    "LingBotVideoTransformer3DModel": ("lingbot_video", "lingbot_video.LingBotVideoConfig"),
    "LingBotWorldTransformer3DModel": ("lingbotworld.model", "lingbotworld.LingBotWorldVideoConfig"),
    "LingBotWorld2CausalFastTransformer3DModel": (
        "lingbotworld2.causal_fast", "lingbotworld2.LingBotWorld2CausalFastVideoConfig"),
    "LongCatTransformer3DModel": ("longcat", "longcat.LongCatVideoConfig"),
    "LTX2Transformer3DModel": ("ltx2", "ltx2.LTX2VideoConfig"),
    "MagiHumanDiT": ("magi_human", "magi_human.MagiHumanVideoConfig"),
    "CausalMatrixGame2WanModel": ("matrixgame2.causal_model", "matrixgame2.MatrixGame2WanVideoConfig"),
    "MatrixGame2WanModel": ("matrixgame2.model", "matrixgame2.MatrixGame2WanVideoConfig"),
    "MatrixGame3WanModel": ("matrixgame3.model", "matrixgame3.MatrixGame3WanVideoConfig"),
    "MiniMaxH3Transformer3DModel": ("minimax_h3", "minimax_h3.MiniMaxH3Config"),
    "MMAudioTransformer": ("mmaudio", "mmaudio.MMAudioTransformerConfig"),
    "SD3Transformer2DModel": ("sd3", "sd3.SD3DiTConfig"),
    "StableAudioDiT": ("stable_audio", "stable_audio.StableAudioConfig"),
    "WanTransformer3DModel": ("wanvideo", "wanvideo.WanVideoConfig"),
    "ZImageTransformer2DModel": ("zimage", "zimage.ZImageDiTConfig"),
}

FASTVIDEO_FULL_SIZE_SHARE: dict[str, float] = {
    "CausalMatrixGame2WanModel": 0.987,
    "CausalWanTransformer3DModel": 0.984,
    "Cosmos25Transformer3DModel": 0.990,
    "CosmosTransformer3DModel": 0.990,
    "DreamXWorldARTransformer3DModel": 0.985,
    "DreamXWorldTransformer3DModel": 0.987,
    "Flux2Transformer2DModel": 0.980,
    "FluxTransformer2DModel": 0.995,
    "Gen3CTransformer3DModel": 0.990,
    "GlmImageTransformer2DModel": 0.981,
    "HYWorldTransformer3DModel": 0.993,
    "HunyuanGameCraftTransformer3DModel": 0.993,
    "HunyuanVideo15Transformer3DModel": 0.994,
    "HunyuanVideoTransformer3DModel": 0.993,
    "Kandinsky5Transformer3DModel": 0.995,
    "LTX2Transformer3DModel": 0.982,
    "LingBotVideoTransformer3DModel": 0.965,
    "LingBotWorld2CausalFastTransformer3DModel": 0.984,
    "LingBotWorldTransformer3DModel": 0.984,
    "LongCatTransformer3DModel": 0.997,
    "MMAudioTransformer": 0.888,
    "MagiHumanDiT": 0.997,
    "MatrixGame2WanModel": 0.987,
    "MatrixGame3WanModel": 0.980,
    "MiniMaxH3Transformer3DModel": 0.998,
    "SD3Transformer2DModel": 0.991,
    "StableAudioDiT": 0.992,
    "WanTransformer3DModel": 0.984,
    "ZImageTransformer2DModel": 0.998,
}

_FV_WAN = dict(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, num_channels_latents=4,
               hidden_size=24, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)

#: Tiny FastVideo DiTs: arguments of the config's arch_config, and inputs.
FASTVIDEO_TINY: dict[str, Case] = {
    "WanTransformer3DModel": Case(_FV_WAN, lambda: video_inputs()),
    "HunyuanVideoTransformer3DModel": Case(
        dict(patch_size=2, patch_size_t=1, in_channels=16, out_channels=16, num_attention_heads=4,
             attention_head_dim=16, hidden_size=64, mlp_ratio=2.0, num_layers=2, num_single_layers=3,
             num_refiner_layers=1, rope_axes_dim=(4, 6, 6), guidance_embeds=False, text_embed_dim=64,
             pooled_projection_dim=32),
        lambda: dict(hidden_states=r(1, 16, 4, 8, 8), encoder_hidden_states=[r(1, 8, 64), r(1, 32)], timestep=t(500))),
    "CausalWanTransformer3DModel": Case(_FV_WAN, lambda: dict(video_inputs(), timestep=torch.full((1, 2), 500))),
    "LingBotWorldTransformer3DModel": Case(_FV_WAN, lambda: video_inputs()),
    "DreamXWorldTransformer3DModel": Case(_FV_WAN, lambda: video_inputs()),
    "Flux2Transformer2DModel": Case(
        dict(in_channels=4, out_channels=4, num_channels_latents=4, num_layers=1, num_single_layers=2,
             attention_head_dim=16, num_attention_heads=2, hidden_size=32, joint_attention_dim=32,
             axes_dims_rope=(4, 4, 4, 4)),
        flux2_inputs),
    "ZImageTransformer2DModel": Case(
        dict(in_channels=4, out_channels=4, num_channels_latents=4, dim=16, hidden_size=16, n_layers=2,
             n_refiner_layers=1, n_heads=1, num_attention_heads=1, n_kv_heads=1, cap_feat_dim=16,
             axes_dims=(8, 4, 4), axes_lens=(256, 32, 32), adaln_embed_dim=16, timestep_mid_size=32),
        lambda: dict(hidden_states=[r(4, 1, 8, 8)], encoder_hidden_states=[r(8, 16)], timestep=t(0.5))),
    "CosmosTransformer3DModel": Case(
        dict(in_channels=5, out_channels=4, num_channels_latents=5, num_attention_heads=2, attention_head_dim=12,
             hidden_size=24, num_layers=2, mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32),
             rope_scale=(2.0, 1.0, 1.0)),
        lambda: dict(hidden_states=r(1, 4, 1, 8, 8), timestep=t(500), encoder_hidden_states=r(1, 8, 16),
                     fps=30, condition_mask=torch.ones(1, 1, 1, 8, 8), padding_mask=torch.zeros(1, 1, 8, 8))),
    "Cosmos25Transformer3DModel": Case(
        dict(in_channels=4, out_channels=4, num_channels_latents=4, num_attention_heads=2, attention_head_dim=12,
             hidden_size=24, num_layers=2, mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32),
             rope_scale=(1.0, 1.0, 1.0)),
        lambda: dict(hidden_states=r(1, 4, 1, 8, 8), timestep=t(500), encoder_hidden_states=r(1, 8, 16),
                     fps=30, condition_mask=torch.ones(1, 1, 1, 8, 8), padding_mask=torch.zeros(1, 1, 8, 8))),
    "Kandinsky5Transformer3DModel": Case(
        dict(in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=16, out_visual_dim=4, model_dim=32,
             hidden_size=32, num_attention_heads=2, ff_dim=64, num_text_blocks=1, num_visual_blocks=2,
             axes_dims=(4, 6, 6)),
        lambda: dict(hidden_states=r(1, 2, 8, 8, 4), encoder_hidden_states=r(1, 8, 16), timestep=t(500.0),
                     pooled_projections=r(1, 8), visual_rope_pos=[torch.arange(2), torch.arange(4), torch.arange(4)],
                     text_rope_pos=torch.arange(8))),
}
FASTVIDEO_TINY.update({
    "FluxTransformer2DModel": Case(
        dict(in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)),
        lambda: flux_inputs(pooled=32, guidance=True)),
    "SD3Transformer2DModel": Case(
        dict(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
             caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8, dual_attention_layers=[0],
             in_channels=4, out_channels=4),
        lambda: dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 6, 16), pooled_projections=r(1, 8),
                     timestep=t(500))),
    # cross-attention heads are cond_token_dim // head dim (embed_dim // heads): 32 // 32, one KV head
    "StableAudioDiT": Case(
        dict(io_channels=8, embed_dim=64, depth=2, num_attention_heads=2, cond_token_dim=32, global_cond_dim=16),
        lambda: dict(x=r(1, 8, 12), t=t(0.5), cross_attn_cond=r(1, 5, 32), global_embed=r(1, 16))),
})

# Matrix-Game's action module: its mouse and keyboard heads are 64 wide (sum of mouse_qk_dim_list, fixed by
# its rotary table); one head each keeps them small.
_FV_ACTION = dict(blocks=[0], enable_mouse=True, enable_keyboard=True, heads_num=1, hidden_size=128, img_hidden_size=24,
                  keyboard_dim_in=4, keyboard_hidden_dim=64, mouse_dim_in=2, mouse_hidden_dim=64,
                  mouse_qk_dim_list=[8, 28, 28], patch_size=[1, 2, 2], qk_norm=True, qkv_bias=False,
                  rope_dim_list=[8, 28, 28], rope_theta=256, vae_time_compression_ratio=4, windows_size=3)


def _matrixgame2_inputs(**extra):
    # 2 latent frames are 5 raw frames of actions (vae_time_compression_ratio 4)
    return dict(hidden_states=r(1, 4, 2, 8, 8), encoder_hidden_states=None, timestep=t(500),
                encoder_hidden_states_image=[r(1, 5, 16)], mouse_cond=r(1, 5, 2), keyboard_cond=r(1, 5, 4), **extra)


FASTVIDEO_TINY.update({
    "HunyuanVideo15Transformer3DModel": Case(
        dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
             num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12, rope_axes_dim=(4, 6, 6)),
        lambda: dict(hidden_states=r(1, 9, 2, 4, 4), encoder_hidden_states=[r(1, 6, 16), r(1, 4, 8)], timestep=t(500),
                     encoder_hidden_states_image=[r(1, 3, 12)])),
    "MiniMaxH3Transformer3DModel": Case(
        dict(num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2, num_refiner_layers=1,
             ffn_dim=32, in_channels=4, audio_in_channels=6, text_dim=8, freq_dim=8, time_embed_hidden_dim=24,
             time_embed_dim=16, rope_freq_dim=2),
        lambda: minimax_h3_inputs()),
    "MatrixGame2WanModel": Case(dict(_FV_WAN, action_config=_FV_ACTION, text_dim=0, image_dim=16),
                                _matrixgame2_inputs),
    "CausalMatrixGame2WanModel": Case(
        dict(_FV_WAN, action_config=_FV_ACTION, text_dim=0, image_dim=16, num_frames_per_block=1),
        lambda: dict(_matrixgame2_inputs(), timestep=torch.full((1, 2), 500))),
})

FASTVIDEO_TINY.update({
    "LTX2Transformer3DModel": Case(
        dict(num_attention_heads=2, attention_head_dim=8, num_layers=2, cross_attention_dim=16, caption_channels=16,
             num_channels_latents=8, audio_num_attention_heads=2, audio_attention_head_dim=8, audio_in_channels=8,
             audio_out_channels=8, audio_cross_attention_dim=16, connector_num_attention_heads=2,
             connector_attention_head_dim=8, connector_num_layers=1, audio_connector_num_attention_heads=2,
             audio_connector_attention_head_dim=8, audio_connector_num_layers=1),
        lambda: dict(hidden_states=r(1, 8, 2, 4, 4), encoder_hidden_states=r(1, 6, 16), timestep=t(0.5),
                     audio_hidden_states=r(1, 8, 5, 1), audio_encoder_hidden_states=r(1, 6, 16),
                     audio_timestep=t(0.5))),
    "GlmImageTransformer2DModel": Case(
        dict(hidden_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
             num_attention_heads=2, text_embed_dim=32, time_embed_dim=16, condition_dim=8,
             prior_vq_quantizer_codebook_size=64),
        lambda: dict(hidden_states=r(1, 4, 8, 8), encoder_hidden_states=r(1, 8, 32), prior_token_id=t(3),
                     prior_token_drop=torch.zeros(1, dtype=torch.bool), timestep=t(500),
                     target_size=torch.tensor([[8.0, 8.0]]), crop_coords=torch.tensor([[0.0, 0.0]]))),
    "MatrixGame3WanModel": Case(
        dict(_FV_WAN, action_config=dict(_FV_ACTION, keyboard_dim_in=6), camera_embed_in_channels=12),
        lambda: dict(hidden_states=r(1, 4, 2, 8, 8), encoder_hidden_states=r(1, 8, 16), timestep=t(500),
                     mouse_cond=r(1, 5, 2), keyboard_cond=r(1, 5, 6))),
})

_HYWORLD_K = torch.tensor([[4.0, 0.0, 2.0], [0.0, 4.0, 2.0], [0.0, 0.0, 1.0]])

FASTVIDEO_TINY.update({
    "HYWorldTransformer3DModel": Case(
        dict(in_channels=9, out_channels=4, hidden_size=32, heads_num=2, mm_double_blocks_depth=2,
             rope_dim_list=[4, 6, 6], text_states_dim=16, text_states_dim_2=8, vision_states_dim=12),
        lambda: dict(hidden_states=r(1, 9, 2, 4, 4), encoder_hidden_states=[r(1, 6, 16), r(1, 4, 8)],
                     timestep=t(500, 500), encoder_hidden_states_image=[r(1, 3, 12)],
                     encoder_attention_mask=[torch.ones(1, 6), torch.ones(1, 4)], action=t(0, 1),
                     viewmats=torch.eye(4).expand(1, 2, 4, 4).clone(), Ks=_HYWORLD_K.expand(1, 2, 3, 3).clone(),
                     timestep_txt=t(500))),  # one timestep and one action per latent frame
})

FASTVIDEO_TINY.update({
    "Gen3CTransformer3DModel": Case(  # no 3D cache given: its pose channels are zeros, as in a text-only call
        dict(in_channels=4, out_channels=4, frame_buffer_max=1, num_attention_heads=2, attention_head_dim=12,
             num_layers=2, mlp_ratio=2.0, text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32)),
        lambda: dict(hidden_states=r(1, 4, 1, 8, 8), timestep=t(500), encoder_hidden_states=r(1, 8, 16), fps=24,
                     padding_mask=torch.zeros(1, 1, 8, 8))),
    "LongCatTransformer3DModel": Case(  # its 3D RoPE needs a head width divisible by 8
        dict(hidden_size=32, depth=2, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
             num_channels_latents=4, caption_channels=16, adaln_tembed_dim=16, frequency_embedding_size=32,
             mlp_ratio=2),
        lambda: dict(hidden_states=r(1, 4, 2, 8, 8), encoder_hidden_states=r(1, 8, 16), timestep=t(500),
                     encoder_attention_mask=torch.ones(1, 8))),
})

FASTVIDEO_TINY.update({
    "MMAudioTransformer": Case(  # sync tokens come in groups of 8
        dict(latent_dim=8, clip_dim=8, sync_dim=8, text_dim=8, hidden_dim=32, depth=2, fused_depth=1, num_heads=2,
             latent_seq_len=8, clip_seq_len=4, sync_seq_len=16, text_seq_len=4),
        lambda: dict(hidden_states=r(1, 8, 8), encoder_hidden_states=(r(1, 4, 8), r(1, 16, 8), r(1, 4, 8)),
                     timestep=t(0.5))),
    "LingBotVideoTransformer3DModel": Case(  # with its mixture of experts
        dict(in_channels=4, out_channels=4, hidden_size=32, num_attention_heads=2, depth=2, intermediate_size=32,
             text_dim=16, freq_dim=32, axes_dims=(8, 4, 4), axes_lens=(64, 32, 32), num_experts=2,
             num_experts_per_tok=1, moe_intermediate_size=16),
        lambda: dict(hidden_states=r(1, 4, 2, 8, 8), timestep=t(500), encoder_hidden_states=r(1, 8, 16))),
})

FASTVIDEO_TINY["HunyuanGameCraftTransformer3DModel"] = Case(  # no camera states: its camera net is not called
    dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, mlp_ratio=2.0, num_layers=1,
         num_single_layers=2, num_refiner_layers=1, rope_axes_dim=(4, 6, 6), text_embed_dim=16, pooled_projection_dim=8,
         camera_out_channels=4),
    lambda: dict(x=r(1, 9, 2, 8, 8), encoder_hidden_states=[r(1, 6, 16), r(1, 8)], timestep=t(500),
                 encoder_attention_mask=[torch.ones(1, 6)]))


def _magi_inputs():
    # one packed stream: 8 video tokens (2x2x2), 4 audio, 3 text; coords are (t, h, w, T, H, W, ref T, H, W)
    from fastvideo.models.dits.magi_human import Modality

    video = [(f, h, w, 2, 2, 2, 2, 2, 2) for f in range(2) for h in range(2) for w in range(2)]
    audio = [(i, 0, 0, 4, 1, 1, 4, 1, 1) for i in range(4)]
    text = [(i, 0, 0, 3, 1, 1, 3, 1, 1) for i in range(3)]
    modality = [Modality.VIDEO] * len(video) + [Modality.AUDIO] * len(audio) + [Modality.TEXT] * len(text)
    return dict(x=r(15, 12), coords_mapping=torch.tensor(video + audio + text, dtype=torch.float32),
                modality_mapping=torch.tensor(modality))


FASTVIDEO_TINY["MagiHumanDiT"] = Case(
    dict(num_layers=2, hidden_size=32, head_dim=16, num_query_groups=1, video_in_channels=8, audio_in_channels=6,
         text_in_channels=12, mm_layers=(0, 1), gelu7_layers=(0,)),
    _magi_inputs)


def _kv_caches(layers, tokens, heads=2, head_dim=12):
    """Empty self- and cross-attention caches for an autoregressive Wan: one chunk of `tokens` tokens."""
    kv = [dict(k=torch.zeros(1, tokens, heads, head_dim), v=torch.zeros(1, tokens, heads, head_dim),
               global_end_index=t(0), local_end_index=t(0)) for _ in range(layers)]
    return dict(kv_cache=kv, crossattn_cache=[dict(is_init=False, k=None, v=None) for _ in range(layers)])


FASTVIDEO_TINY["DreamXWorldARTransformer3DModel"] = Case(  # one chunk of 2 frames (32 tokens), one timestep a token
    dict(_FV_WAN, text_len=8, cam_self_attn_layers=None, local_attn_size=-1, num_frames_per_block=2),
    lambda: dict(hidden_states=r(1, 4, 2, 8, 8), timestep=torch.full((1, 32), 500), encoder_hidden_states=r(1, 8, 16),
                 **_kv_caches(2, 32)))
