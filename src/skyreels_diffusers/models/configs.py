"""Transformer configurations: the real SkyReels-V3 checkpoints and the tiny ones used by `--model tiny`, the tests
and the benchmarks (one source of truth)."""

from __future__ import annotations


_WAN_14B = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=40,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)

_AVATAR_EXTRA = dict(
    in_channels=36,
    image_dim=1280,
    added_kv_proj_dim=5120,
    audio_in_dim=768,
    audio_in_layers=12,
    audio_window=5,
    audio_vae_scale=4,
    audio_intermediate_dim=512,
    audio_dim=768,
    audio_context_tokens=32,
    audio_norm_output=True,
    audio_norm_input=True,
)

#: Real sizes: reference-to-video and extension (14B each), talking avatar (19B).
TRANSFORMER_CONFIGS: dict[str, dict] = {
    "reference": dict(_WAN_14B),
    "extension": dict(_WAN_14B),
    "avatar": {**_WAN_14B, **_AVATAR_EXTRA},
}

_TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=256,
    ffn_dim=64,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)

#: Tiny, randomly initialised variants (fast on a CPU). The avatar one pairs with a tiny wav2vec2 (width 32,
#: 3 layers) and a tiny CLIP vision tower (width 32).
TINY_TRANSFORMER_CONFIGS: dict[str, dict] = {
    "reference": dict(_TINY),
    "extension": dict(_TINY),
    "avatar": {
        **_TINY,
        "in_channels": 36,
        "image_dim": 32,
        "added_kv_proj_dim": 32,
        "audio_in_dim": 32,
        "audio_in_layers": 3,
        "audio_window": 5,
        "audio_vae_scale": 4,
        "audio_intermediate_dim": 16,
        "audio_dim": 16,
        "audio_context_tokens": 4,
        "audio_norm_output": True,
        "audio_norm_input": True,
    },
}

VARIANTS = tuple(TRANSFORMER_CONFIGS)
