"""The pipelines' other components from the single files users have, one call each, strictly.

What ComfyUI users hold (key names verified against ComfyUI's and kijai's WanVideoWrapper's loaders):

* text encoder (`models/text_encoders`): ComfyUI's `umt5_xxl_fp16.safetensors` / `umt5_xxl_fp8_e4m3fn_scaled.safetensors`
  (transformers' UMT5 names: `shared.weight`, `encoder.block.N.layer.0.SelfAttention.q.weight`, ...; the FP8 one
  in the scaled-FP8 layout, `scaled_fp8.py`; a `spiece_model` tensor with the tokenizer's bytes may ride along and
  is skipped), kijai's `umt5-xxl-enc-bf16.safetensors` and the original `models_t5_umt5-xxl-enc-bf16.pth` (Wan-native
  names: `token_embedding.weight`, `blocks.N.attn.q.weight`, ...) -> `UMT5EncoderModel`. FP8 linears stay FP8
  (torchao weight-only) unless `keep_fp8=False`.
* image encoder (`models/clip_vision`): ComfyUI's `clip_vision_h.safetensors` (transformers' CLIP vision names,
  `vision_model.*`, plus a `visual_projection.weight` the pipelines do not use), open-clip checkpoints
  (`visual.transformer.resblocks.N.attn.in_proj_weight`, ...) and the original / kijai open-clip XLM-RoBERTa ViT-H/14
  file (`visual.transformer.N.attn.to_qkv.weight`, ...; the text tower is dropped) -> `CLIPVisionModel`.
* VAE (`models/vae`): ComfyUI's `wan_2.1_vae.safetensors`, kijai's `Wan2_1_VAE_bf16.safetensors`, the original
  `Wan2.1_VAE.pth` (Wan-native names, converted with diffusers' own `convert_wan_vae_to_diffusers`) or a diffusers
  `AutoencoderKLWan` state dict -> `AutoencoderKLWan` (float32). Online, diffusers'
  `AutoencoderKLWan.from_single_file(path)` does the same with a config from the Hub; here the config is read off
  the tensors.
* wav2vec2 (`models/wav2vec2`): kijai's `wav2vec2-chinese-base_fp16.safetensors` (a `Wav2Vec2ForPreTraining` state
  dict: `wav2vec2.`-prefixed names, the positional convolution as `weight_g` / `weight_v`, pre-training heads that
  are dropped) or a bare `Wav2Vec2Model` state dict -> `Wav2Vec2Model` (float32) and the original's feature
  extractor (`do_normalize=True`, as in the chinese-wav2vec2-base folder the original reads).

Configurations are read off the tensor shapes (head widths as in the real models: UMT5 from its relative-bias
table, CLIP 80, wav2vec2 64) unless `config=` gives one (a config object, a dict, or a folder / `config.json`).
Every loader is strict: a missing, unexpected or misshapen tensor raises naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .components import CLIP_KEY_MAP, T5_KEY_MAP, T5_TIED_KEY, build_clip_vision, build_wan_vae, check_keys, t5_config
from .scaled_fp8 import assign_fp8_linears, dequantize_fp8, split_fp8_linears, split_fp8_scales
from .single_file import checkpoint_files, read_checkpoint, safetensors_metadata
from .transformer_conversion import KeyMap, map_keys, rename_state_dict


# transformers' CLIP (ComfyUI's clip_vision_h): the vision tower as it is; projection and any text tower dropped
CLIP_HF_KEY_MAP: KeyMap = [
    (r"vision_model\..*", r"\g<0>"),
    (r"visual_projection\.weight|text_projection\.weight|logit_scale|text_model\..*", None),
]
_RESBLOCK = r"visual\.transformer\.resblocks\.(\d+)\."
_LAYER = r"vision_model.encoder.layers.\1."
# open-clip ViT (`visual.transformer.resblocks.N`, fused attention input projection) -> transformers' CLIP vision
CLIP_OPEN_CLIP_KEY_MAP: KeyMap = [
    (r"visual\.class_embedding", r"vision_model.embeddings.class_embedding"),
    (r"visual\.positional_embedding", r"vision_model.embeddings.position_embedding.weight"),
    (r"visual\.conv1\.weight", r"vision_model.embeddings.patch_embedding.weight"),
    (r"visual\.ln_pre\.(weight|bias)", r"vision_model.pre_layrnorm.\1"),
    (r"visual\.ln_post\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (_RESBLOCK + r"ln_1\.(weight|bias)", _LAYER + r"layer_norm1.\2"),
    (_RESBLOCK + r"ln_2\.(weight|bias)", _LAYER + r"layer_norm2.\2"),
    (_RESBLOCK + r"attn\.in_proj_weight", tuple(_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv")),
    (_RESBLOCK + r"attn\.in_proj_bias", tuple(_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv")),
    (_RESBLOCK + r"attn\.out_proj\.(weight|bias)", _LAYER + r"self_attn.out_proj.\2"),
    (_RESBLOCK + r"mlp\.c_fc\.(weight|bias)", _LAYER + r"mlp.fc1.\2"),
    (_RESBLOCK + r"mlp\.c_proj\.(weight|bias)", _LAYER + r"mlp.fc2.\2"),
    (r"visual\.proj", None),  # projection to the joint space: not part of the penultimate-layer features
    (r"(?!visual\.).*", None),  # the text tower
]
# wav2vec2 pre-training heads (Wav2Vec2ForPreTraining), not part of the encoder the avatar reads
WAV2VEC2_HEADS = ("quantizer.", "project_q.", "project_hid.", "lm_head.")
WAV2VEC2_POS_CONV = "encoder.pos_conv_embed.conv."
#: the original's `chinese-wav2vec2-base/config.json` architecture (sizes are re-read from the tensors)
WAV2VEC2_BASE_CONFIG = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    conv_dim=[512] * 7,
    conv_kernel=[10, 3, 3, 3, 3, 2, 2],
    conv_stride=[5, 2, 2, 2, 2, 2, 2],
    conv_bias=False,
    feat_extract_norm="group",
    num_conv_pos_embeddings=128,
    num_conv_pos_embedding_groups=16,
    do_stable_layer_norm=False,
    layer_norm_eps=1e-5,
    hidden_act="gelu",
)
WAV2VEC2_HEAD_DIM = 64
#: the original's `chinese-wav2vec2-base/preprocessor_config.json`
FEATURE_EXTRACTOR_CONFIG = dict(
    feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=False
)


# --------------------------------------------------------------------------------------------- reading


def read_weights(path: str | os.PathLike | list) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """(what, tensors, safetensors metadata) of a `.safetensors` / `.pth` file or shards (truncation checked)."""
    files = checkpoint_files(path)
    return ", ".join(str(f) for f in files), read_checkpoint(files), safetensors_metadata(files)


def dequantized(state: dict, what: str, metadata: dict) -> dict[str, torch.Tensor]:
    """Every FP8 tensor of a (scaled-)FP8 file dequantised to float32 (components kept in higher precision)."""
    for key, scale in split_fp8_scales(state, what, metadata).items():
        state[key] = dequantize_fp8(state[key], scale)
    return state


def strip_prefix(state: dict, anchor: str, what: str) -> dict:
    """Remove the prefix that the key ending in `anchor` has (e.g. `wav2vec2.`), which every key then needs."""
    prefix = next((k[: -len(anchor)] for k in state if k.endswith(anchor)), "")
    if not prefix:
        return state
    outside = sorted(k for k in state if not k.startswith(prefix))
    if outside:
        raise KeyError(f"{what}: keys outside the {prefix!r} prefix of the others: {outside[:10]}")
    return {k[len(prefix) :]: v for k, v in state.items()}


def resolve_hf_config(config: Any, config_class: type):
    """A transformers config from an object, a dict, or a folder / `config.json` path; None stays None."""
    if config is None or isinstance(config, config_class):
        return config
    if isinstance(config, dict):
        return config_class(**config)
    path = Path(config)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"config={str(config)!r}: no config.json there")
    return config_class(**{k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")})


def _rename_scales(scales: dict, key_map: KeyMap, what: str) -> dict:
    if not scales:
        return scales
    try:
        mapped = map_keys(list(scales), key_map)
    except KeyError as error:
        raise KeyError(f"{what}: {error.args[0]}") from None
    return {m.target: m.take(scales[m.source]) if scales[m.source].ndim else scales[m.source] for m in mapped}


def _check_shapes(model: torch.nn.Module, state: dict, what: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = {
        k: (tuple(v.shape), expected[k]) for k, v in state.items() if k in expected and tuple(v.shape) != expected[k]
    }
    if wrong:
        raise ValueError(f"{what}: tensor shapes do not fit the model (got, expected): {wrong}")


def _left_on_meta(model: torch.nn.Module, what: str) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left unloaded: {left}")


# --------------------------------------------------------------------------------------------- text encoder


def _t5_state(state: dict, metadata: dict, what: str) -> tuple[dict, dict]:
    """(tensors under transformers' UMT5 names, their FP8 scales) from either naming."""
    state.pop("spiece_model", None)  # ComfyUI may embed the tokenizer's bytes: the tokenizer is loaded on its own
    scales = split_fp8_scales(state, what, metadata)
    if any(k.endswith("token_embedding.weight") for k in state):  # Wan-native names
        state = strip_prefix(state, "token_embedding.weight", what)
        return rename_state_dict(state, T5_KEY_MAP, what), _rename_scales(scales, T5_KEY_MAP, what)
    state = strip_prefix(state, "shared.weight", what)
    return state, scales


def load_text_encoder_file(
    path: str | os.PathLike | list,
    torch_dtype: torch.dtype = torch.bfloat16,
    keep_fp8: bool = True,
    config: Any = None,
    device: str | torch.device | None = None,
):
    """A UMT5-XXL encoder file (ComfyUI's bf16 / FP8-scaled, kijai's, the original `.pth`) -> `UMT5EncoderModel`.

    FP8 linears stay FP8 with the file's scales (torchao weight-only, computed in `torch_dtype`) unless
    `keep_fp8=False`; everything else is loaded in `torch_dtype`.

    ```py
    >>> text_encoder = load_text_encoder_file("models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    ```
    """
    from transformers import UMT5Config, UMT5EncoderModel

    what, state, metadata = read_weights(path)
    state, scales = _t5_state(state, metadata, what)
    tied = state.pop(T5_TIED_KEY, None)
    if tied is not None and "shared.weight" in state and not torch.equal(tied, state["shared.weight"]):
        raise ValueError(f"{what}: {T5_TIED_KEY} differs from shared.weight (they are one tensor in UMT5)")
    config = resolve_hf_config(config, UMT5Config) or t5_config({k: tuple(v.shape) for k, v in state.items()})
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    check_keys(set(model.state_dict()) - {T5_TIED_KEY}, set(state), f"text encoder {what}")
    _check_shapes(model, state, what)
    fp8 = split_fp8_linears(model, state, scales, keep_fp8)
    weights = {k: v.to(torch_dtype) for k, v in state.items()}
    weights[T5_TIED_KEY] = weights["shared.weight"]
    model.load_state_dict(weights, strict=False, assign=True)
    assign_fp8_linears(model, fp8, torch_dtype)
    _left_on_meta(model, what)
    return model.to(device).eval() if device is not None else model.eval()


# --------------------------------------------------------------------------------------------- image encoder


def load_image_encoder_file(
    path: str | os.PathLike | list, torch_dtype: torch.dtype = torch.bfloat16, config: Any = None
):
    """A CLIP ViT-H/14 vision file (ComfyUI's `clip_vision_h.safetensors`, an open-clip checkpoint, the original /
    kijai open-clip XLM-RoBERTa file) -> `CLIPVisionModel` (sizes read off the tensors unless `config=`).

    ```py
    >>> image_encoder = load_image_encoder_file("models/clip_vision/clip_vision_h.safetensors")
    ```
    """
    from transformers import CLIPVisionConfig

    what, state, metadata = read_weights(path)
    state = dequantized(state, what, metadata)
    if any(k.startswith("vision_model.") for k in state):
        key_map = CLIP_HF_KEY_MAP
    elif "visual.transformer.resblocks.0.attn.in_proj_weight" in state:
        key_map = CLIP_OPEN_CLIP_KEY_MAP
    else:
        key_map = CLIP_KEY_MAP
    converted = rename_state_dict(state, key_map, f"image encoder {what}")
    return build_clip_vision(
        converted, torch_dtype, f"image encoder {what}", resolve_hf_config(config, CLIPVisionConfig)
    )


# --------------------------------------------------------------------------------------------- VAE


def load_vae_file(path: str | os.PathLike | list, torch_dtype: torch.dtype = torch.float32, config: Any = None):
    """A Wan2.1 VAE file (ComfyUI's `wan_2.1_vae.safetensors`, kijai's bf16 file, the original `.pth`, or diffusers
    keys) -> `AutoencoderKLWan` (float32 by default; base width and latent channels read off the tensors).

    ```py
    >>> vae = load_vae_file("models/vae/wan_2.1_vae.safetensors")
    ```
    """
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    what, state, metadata = read_weights(path)
    state = dequantized(state, what, metadata)
    if "decoder.middle.0.residual.0.gamma" in state:  # Wan-native names
        state = convert_wan_vae_to_diffusers(state)
    return build_wan_vae(state, f"VAE {what}", torch_dtype, config)


# --------------------------------------------------------------------------------------------- audio encoder


def _wav2vec2_state(state: dict, what: str) -> dict:
    """transformers' `Wav2Vec2Model` names: `wav2vec2.` prefix and pre-training heads dropped, the positional
    convolution's weight-norm halves under their parametrisation names."""
    state = {k: v for k, v in state.items() if not k.startswith(WAV2VEC2_HEADS)}
    state = strip_prefix(state, "feature_projection.projection.weight", f"audio encoder {what}")
    renames = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
    for old, new in renames.items():
        if WAV2VEC2_POS_CONV + old in state:
            state[WAV2VEC2_POS_CONV + new] = state.pop(WAV2VEC2_POS_CONV + old)
    return state


def wav2vec2_config(state: dict):
    """The original's wav2vec2 architecture with the sizes of these tensors."""
    from transformers import Wav2Vec2Config

    hidden = state["feature_projection.projection.weight"].shape[0]
    convs = sorted({int(k.split(".")[2]) for k in state if k.startswith("feature_extractor.conv_layers.")})
    conv = [state[f"feature_extractor.conv_layers.{i}.conv.weight"] for i in convs]
    pos = state[WAV2VEC2_POS_CONV + "parametrizations.weight.original1"]
    return Wav2Vec2Config(
        **{
            **WAV2VEC2_BASE_CONFIG,
            "hidden_size": hidden,
            "num_hidden_layers": len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")}),
            "num_attention_heads": max(1, hidden // WAV2VEC2_HEAD_DIM),
            "intermediate_size": state["encoder.layers.0.feed_forward.intermediate_dense.weight"].shape[0],
            "conv_dim": [w.shape[0] for w in conv],
            "conv_kernel": [w.shape[-1] for w in conv],
            "conv_stride": WAV2VEC2_BASE_CONFIG["conv_stride"][: len(conv)],
            "conv_bias": "feature_extractor.conv_layers.0.conv.bias" in state,
            "feat_extract_norm": "layer" if "feature_extractor.conv_layers.1.layer_norm.weight" in state else "group",
            "num_conv_pos_embeddings": pos.shape[-1],
            "num_conv_pos_embedding_groups": hidden // pos.shape[1],
        }
    )


def load_audio_encoder_file(path: str | os.PathLike | list, config: Any = None):
    """A wav2vec2 file (kijai's `wav2vec2-chinese-base_fp16.safetensors`, or a `Wav2Vec2Model` state dict) ->
    (`Wav2Vec2Model` in float32, the original's `Wav2Vec2FeatureExtractor`). `config`: a `Wav2Vec2Config`, a dict
    or a folder (its `preprocessor_config.json`, when there, configures the feature extractor).

    ```py
    >>> audio_encoder, feature_extractor = load_audio_encoder_file("models/wav2vec2/wav2vec2-chinese-base_fp16.safetensors")
    ```
    """
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    what, state, metadata = read_weights(path)
    state = _wav2vec2_state(dequantized(state, what, metadata), what)
    model_config = resolve_hf_config(config, Wav2Vec2Config) or wav2vec2_config(state)
    with torch.device("meta"):
        model = Wav2Vec2Model(model_config)
    state.setdefault("masked_spec_embed", torch.zeros(model_config.hidden_size))  # training-time masking only
    check_keys(set(model.state_dict()), set(state), f"audio encoder {what}")
    _check_shapes(model, state, what)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    _left_on_meta(model, what)
    processor = Path(config) / "preprocessor_config.json" if isinstance(config, (str, os.PathLike)) else None
    if processor is not None and processor.is_file():
        feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(processor.parent)
    else:
        feature_extractor = Wav2Vec2FeatureExtractor(**FEATURE_EXTRACTOR_CONFIG)
    return model.eval(), feature_extractor
