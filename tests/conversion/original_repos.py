"""Tiny repos in the ORIGINAL SkyReels-V3 layouts and key names, built offline for the converter tests.

The inverse key maps here are written independently of the converter (from the original module structure), so a
round trip through the converter checks it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file

from skyreels_diffusers.app.tiny import tiny_text_encoder, tiny_tokenizer, tiny_transformer, tiny_vae
from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS
from tests.helpers import GoldenCase


# transformers UMT5EncoderModel -> Wan-native T5 (`models_t5_umt5-xxl-enc-bf16.pth`)
_T5_TO_ORIGINAL = [
    (r"shared\.weight", r"token_embedding.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)\.weight", r"blocks.\1.attn.\2.weight"),
    (
        r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
        r"blocks.\1.pos_embedding.embedding.weight",
    ),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.0.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
    (r"encoder\.final_layer_norm\.weight", r"norm.weight"),
]

# diffusers AutoencoderKLWan -> Wan2.1 `WanVAE_` (residual blocks: 0 norm, 2 conv, 3 norm, 6 conv)
_RES = {
    "norm1.gamma": "residual.0.gamma",
    "conv1": "residual.2",
    "norm2.gamma": "residual.3.gamma",
    "conv2": "residual.6",
    "conv_shortcut": "shortcut",
}


def _vae_key_to_original(key: str) -> str:
    fixed = {
        "quant_conv": "conv1",
        "post_quant_conv": "conv2",
        "encoder.conv_in": "encoder.conv1",
        "decoder.conv_in": "decoder.conv1",
        "encoder.norm_out.gamma": "encoder.head.0.gamma",
        "decoder.norm_out.gamma": "decoder.head.0.gamma",
        "encoder.conv_out": "encoder.head.2",
        "decoder.conv_out": "decoder.head.2",
    }
    for ours, theirs in fixed.items():
        if key.startswith(ours + ".") or key == ours:
            return theirs + key[len(ours) :]
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(norm1\.gamma|conv1|norm2\.gamma|conv2)(.*)", key)
    if m:
        return f"{m[1]}.middle.{2 * int(m[2])}.{_RES[m[3]]}{m[4]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key)
    if m:
        return f"{m[1]}.middle.1.{m[2]}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(norm1\.gamma|conv1|norm2\.gamma|conv2|conv_shortcut)(.*)", key)
    if m:
        return f"encoder.downsamples.{m[1]}.{_RES[m[2]]}{m[3]}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resample|time_conv)(.*)", key)
    if m:
        return f"encoder.downsamples.{m[1]}.{m[2]}{m[3]}"
    m = re.fullmatch(
        r"decoder\.up_blocks\.(\d)\.resnets\.(\d)\.(norm1\.gamma|conv1|norm2\.gamma|conv2|conv_shortcut)(.*)", key
    )
    if m:
        return f"decoder.upsamples.{4 * int(m[1]) + int(m[2])}.{_RES[m[3]]}{m[4]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d)\.upsamplers\.0\.(.*)", key)
    if m:
        return f"decoder.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise KeyError(key)


def wan_layout_vae(seed: int = 0) -> AutoencoderKLWan:
    """A tiny VAE with the Wan2.1 block structure (width 4 instead of 96)."""
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
    ).eval()


def _rename(state: dict, rules) -> dict:
    out = {}
    for key, tensor in state.items():
        for pattern, target in rules:
            m = re.fullmatch(pattern, key)
            if m:
                out[m.expand(target)] = tensor.clone()
                break
        else:
            if key != "encoder.embed_tokens.weight":  # tied to `shared` in transformers, one tensor in Wan
                raise KeyError(key)
    return out


def build_extension_repo(folder: Path) -> dict:
    """Video-Extension layout: Wan2.1_VAE.pth, T5 .pth, google/umt5-xxl/, transformer/, shot_transformer/.
    The transformers are the golden extension checkpoint (original Wan-native keys). Returns the source objects."""
    folder.mkdir(parents=True)
    tokenizer, text_encoder, vae = tiny_tokenizer(), tiny_text_encoder(seed=1), wan_layout_vae(seed=2)
    tokenizer.save_pretrained(folder / "google" / "umt5-xxl")
    torch.save(_rename(text_encoder.state_dict(), _T5_TO_ORIGINAL), folder / "models_t5_umt5-xxl-enc-bf16.pth")
    torch.save({_vae_key_to_original(k): v.clone() for k, v in vae.state_dict().items()}, folder / "Wan2.1_VAE.pth")
    case = GoldenCase("extension_fp32")
    for name in ("transformer", "shot_transformer"):
        case.write_original_folder(folder / name)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae}


def build_reference_repo(folder: Path) -> dict:
    """Reference2Video layout (diffusers): model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/."""
    folder.mkdir(parents=True)
    parts = {
        "tokenizer": tiny_tokenizer(),
        "text_encoder": tiny_text_encoder(seed=1),
        "vae": tiny_vae(seed=2),
        "transformer": tiny_transformer("reference", seed=3),
    }
    parts["tokenizer"].save_pretrained(folder / "tokenizer")
    parts["text_encoder"].save_pretrained(folder / "text_encoder")
    parts["vae"].save_pretrained(folder / "vae")
    (folder / "transformer").mkdir()
    config = {
        "_class_name": "SkyReelsA2WanI2v3DModel",
        "_diffusers_version": "0.34.0",
        **TINY_TRANSFORMER_CONFIGS["reference"],
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
    }
    config["patch_size"] = list(config["patch_size"])
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    save_file(
        {k: v.contiguous() for k, v in parts["transformer"].state_dict().items()},
        str(folder / "transformer" / "diffusion_pytorch_model.safetensors"),
    )
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    )
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "WanSkyReelsA2WanT2VPipeline",
                "_diffusers_version": "0.34.0",
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "text_encoder": ["transformers", "UMT5EncoderModel"],
                "tokenizer": ["transformers", "T5TokenizerFast"],
                "transformer": ["diffusers", "WanTransformer3DModel"],
                "vae": ["diffusers", "AutoencoderKLWan"],
            }
        )
    )
    return parts


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def open_clip_visual_state(hidden: int = 160, layers: int = 2, patch: int = 14, image: int = 224, seed: int = 0):
    """Random weights of an open-clip ViT visual tower in the original key names (+ unused text-tower keys)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    tokens = (image // patch) ** 2 + 1
    state = {
        "visual.patch_embedding.weight": rnd(hidden, 3, patch, patch),
        "visual.cls_embedding": rnd(1, 1, hidden, scale=0.5),
        "visual.pos_embedding": rnd(1, tokens, hidden, scale=0.5),
        "visual.pre_norm.weight": 1 + rnd(hidden),
        "visual.pre_norm.bias": rnd(hidden),
        "visual.post_norm.weight": 1 + rnd(hidden),
        "visual.post_norm.bias": rnd(hidden),
        "visual.head": rnd(hidden, 32),
        "textual.token_embedding.weight": rnd(10, 8),
        "log_scale": torch.tensor(4.6),
    }
    for i in range(layers):
        p = f"visual.transformer.{i}."
        state.update(
            {
                p + "norm1.weight": 1 + rnd(hidden),
                p + "norm1.bias": rnd(hidden),
                p + "norm2.weight": 1 + rnd(hidden),
                p + "norm2.bias": rnd(hidden),
                p + "attn.to_qkv.weight": rnd(3 * hidden, hidden, scale=hidden**-0.5),
                p + "attn.to_qkv.bias": rnd(3 * hidden),
                p + "attn.proj.weight": rnd(hidden, hidden, scale=hidden**-0.5),
                p + "attn.proj.bias": rnd(hidden),
                p + "mlp.0.weight": rnd(4 * hidden, hidden, scale=hidden**-0.5),
                p + "mlp.0.bias": rnd(4 * hidden),
                p + "mlp.2.weight": rnd(hidden, 4 * hidden, scale=(4 * hidden) ** -0.5),
                p + "mlp.2.bias": rnd(hidden),
            }
        )
    return state


def open_clip_penultimate(state: dict, pixels: torch.Tensor, head_dim: int = 80) -> torch.Tensor:
    """The original visual tower's forward up to the output of its second-to-last block (`use_31_block`),
    written from the open-clip structure: pre-norm blocks, fused qkv, exact GELU, LayerNorm eps 1e-5."""
    import torch.nn.functional as F

    w = state
    x = F.conv2d(pixels, w["visual.patch_embedding.weight"], stride=w["visual.patch_embedding.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([w["visual.cls_embedding"].expand(len(x), -1, -1), x], dim=1) + w["visual.pos_embedding"]
    hidden = x.shape[-1]
    x = F.layer_norm(x, (hidden,), w["visual.pre_norm.weight"], w["visual.pre_norm.bias"], 1e-5)
    layers = len({k.split(".")[2] for k in w if k.startswith("visual.transformer.")})
    for i in range(layers - 1):
        p = f"visual.transformer.{i}."
        y = F.layer_norm(x, (hidden,), w[p + "norm1.weight"], w[p + "norm1.bias"], 1e-5)
        q, k, v = F.linear(y, w[p + "attn.to_qkv.weight"], w[p + "attn.to_qkv.bias"]).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (-1, head_dim)).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1) @ v
        x = x + F.linear(attn.transpose(1, 2).flatten(2), w[p + "attn.proj.weight"], w[p + "attn.proj.bias"])
        y = F.layer_norm(x, (hidden,), w[p + "norm2.weight"], w[p + "norm2.bias"], 1e-5)
        x = x + F.linear(
            F.gelu(F.linear(y, w[p + "mlp.0.weight"], w[p + "mlp.0.bias"])), w[p + "mlp.2.weight"], w[p + "mlp.2.bias"]
        )
    return x


def build_avatar_repo(folder: Path) -> dict:
    """TalkingAvatar layout: the transformer at the root (golden avatar weights, original keys), T5, VAE, CLIP
    `.pth`, `chinese-wav2vec2-base/`, `google/umt5-xxl/`, `xlm-roberta-large/` (unused)."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from skyreels_diffusers.app.tiny import TINY_WAV2VEC2_CONFIG, avatar_feature_extractor

    parts = build_extension_repo(folder)
    for name in ("transformer", "shot_transformer"):
        shutil.rmtree(folder / name)
    GoldenCase("avatar_fp32").write_original_folder(folder)  # config.json + model.safetensors at the root
    clip = open_clip_visual_state()
    torch.save(clip, folder / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth")
    torch.manual_seed(4)
    wav2vec2 = Wav2Vec2Model(Wav2Vec2Config(**TINY_WAV2VEC2_CONFIG)).eval()
    wav2vec2.save_pretrained(folder / "chinese-wav2vec2-base")
    avatar_feature_extractor().save_pretrained(folder / "chinese-wav2vec2-base")
    (folder / "xlm-roberta-large").mkdir()
    return {**parts, "clip_state": clip, "audio_encoder": wav2vec2}
