"""ComfyUI / kijai scaled-FP8 checkpoints built offline from tiny weights, for the FP8 single-file tests.

`scaled_fp8_state(state, layout)` quantises the chosen 2-D weights to float8_e4m3fn with float32 scales (one per
tensor, or one per row) and names them as the layout does:

* `"kijai"`: `<layer>.scale_weight` beside each FP8 weight and a `scaled_fp8` marker (kijai's
  `WanVideo_comfy_fp8_scaled` files, ComfyUI's older `*_fp8_scaled` files);
* `"comfy_quant"`: `<layer>.weight_scale` and a `<layer>.comfy_quant` JSON tensor (ComfyUI's mixed-precision files);
* `"comfy_metadata"`: `<layer>.weight_scale`, the formats in the safetensors metadata `_quantization_metadata`.

Other tensors are stored in `other_dtype` (the modulation tables in float32, as in kijai's files). Returns the file's
tensors, its metadata and the float32 weights the file decodes to (the reference).
"""

from __future__ import annotations

import json
import re

import torch

from skyreels_diffusers.loaders.scaled_fp8 import quantize_to_fp8


BLOCK_LINEAR = re.compile(r"blocks\.\d+\.(?!.*norm).*\.weight")  # 2-D weights inside the blocks


def default_fp8_keys(state: dict) -> list[str]:
    return [k for k, v in state.items() if v.ndim == 2 and BLOCK_LINEAR.fullmatch(k)]


def _format_tensor(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def scaled_fp8_state(
    state: dict[str, torch.Tensor],
    layout: str = "kijai",
    per_row: bool = False,
    fp8_keys: list[str] | None = None,
    other_dtype: torch.dtype = torch.bfloat16,
    prefix: str = "",
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor]]:
    fp8_keys = default_fp8_keys(state) if fp8_keys is None else fp8_keys
    out, reference, layers = {}, {}, {}
    for key, value in state.items():
        if key in fp8_keys:
            q, scale = quantize_to_fp8(value, per_row=per_row)
            layer = key.removesuffix(".weight")
            out[prefix + key] = q
            out[prefix + layer + (".scale_weight" if layout == "kijai" else ".weight_scale")] = scale
            layers[prefix + layer] = {"format": "float8_e4m3fn"}
            if layout == "comfy_quant":
                out[prefix + layer + ".comfy_quant"] = _format_tensor("float8_e4m3fn")
            reference[key] = q.float() * (scale.reshape(-1, 1) if per_row else scale)
        else:
            stored = value.float() if "modulation" in key else value.to(other_dtype)
            out[prefix + key] = stored.contiguous()
            reference[key] = stored.float()
    metadata = {}
    if layout == "kijai":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)  # the marker is written without the prefix
    elif layout == "comfy_metadata":
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return out, metadata, reference


# ---------------------------------------------------------------------------------------------- component layouts
def hf_clip_state(wan: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original open-clip visual tower (Wan-native names) under transformers' CLIP names, as ComfyUI's
    `clip_vision_h.safetensors` holds it (`vision_model.*` + `visual_projection.weight`)."""
    v, out = "vision_model.", {}
    out[v + "embeddings.patch_embedding.weight"] = wan["visual.patch_embedding.weight"]
    out[v + "embeddings.class_embedding"] = wan["visual.cls_embedding"].reshape(-1)
    out[v + "embeddings.position_embedding.weight"] = wan["visual.pos_embedding"][0]
    for ours, theirs in (("pre_layrnorm", "pre_norm"), ("post_layernorm", "post_norm")):
        for p in ("weight", "bias"):
            out[f"{v}{ours}.{p}"] = wan[f"visual.{theirs}.{p}"]
    layers = {k.split(".")[2] for k in wan if k.startswith("visual.transformer.")}
    for i in layers:
        src, dst = f"visual.transformer.{i}.", f"{v}encoder.layers.{i}."
        for p in ("weight", "bias"):
            out[dst + f"layer_norm1.{p}"] = wan[src + f"norm1.{p}"]
            out[dst + f"layer_norm2.{p}"] = wan[src + f"norm2.{p}"]
            for name, part in zip("qkv", wan[src + f"attn.to_qkv.{p}"].chunk(3)):
                out[dst + f"self_attn.{name}_proj.{p}"] = part
            out[dst + f"self_attn.out_proj.{p}"] = wan[src + f"attn.proj.{p}"]
            out[dst + f"mlp.fc1.{p}"] = wan[src + f"mlp.0.{p}"]
            out[dst + f"mlp.fc2.{p}"] = wan[src + f"mlp.2.{p}"]
    out["visual_projection.weight"] = wan["visual.head"].t()
    return {k: t.contiguous() for k, t in out.items()}


def open_clip_resblocks_state(wan: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tower in open-clip's own names (`visual.transformer.resblocks.N`, fused `in_proj`), with a text
    tower beside it (which the loader drops)."""
    out = {
        "visual.conv1.weight": wan["visual.patch_embedding.weight"],
        "visual.class_embedding": wan["visual.cls_embedding"].reshape(-1),
        "visual.positional_embedding": wan["visual.pos_embedding"][0],
        "visual.proj": wan["visual.head"],
        "token_embedding.weight": torch.zeros(10, 8),
        "transformer.resblocks.0.attn.in_proj_weight": torch.zeros(24, 8),
        "logit_scale": torch.tensor(4.6),
    }
    for ours, theirs in (("ln_pre", "pre_norm"), ("ln_post", "post_norm")):
        for p in ("weight", "bias"):
            out[f"visual.{ours}.{p}"] = wan[f"visual.{theirs}.{p}"]
    for i in {k.split(".")[2] for k in wan if k.startswith("visual.transformer.")}:
        src, dst = f"visual.transformer.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[dst + f"ln_1.{p}"] = wan[src + f"norm1.{p}"]
            out[dst + f"ln_2.{p}"] = wan[src + f"norm2.{p}"]
            out[dst + f"attn.in_proj_{p}"] = wan[src + f"attn.to_qkv.{p}"]
            out[dst + f"attn.out_proj.{p}"] = wan[src + f"attn.proj.{p}"]
            out[dst + f"mlp.c_fc.{p}"] = wan[src + f"mlp.0.{p}"]
            out[dst + f"mlp.c_proj.{p}"] = wan[src + f"mlp.2.{p}"]
    return {k: t.contiguous() for k, t in out.items()}


def kijai_wav2vec2_state(state: dict[str, torch.Tensor], dtype=torch.float16) -> dict[str, torch.Tensor]:
    """A `Wav2Vec2Model` state dict as kijai's single wav2vec2 file holds it: `Wav2Vec2ForPreTraining` names
    (`wav2vec2.` prefix, pre-training heads beside it), the positional convolution as `weight_g` / `weight_v`."""
    renames = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    out = {}
    for key, value in state.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        out["wav2vec2." + key] = value.to(dtype).contiguous()
    hidden = state["feature_projection.projection.weight"].shape[0]
    out["quantizer.codevectors"] = torch.zeros(1, 640, 128, dtype=dtype)
    out["quantizer.weight_proj.weight"] = torch.zeros(640, 16, dtype=dtype)
    out["project_q.weight"] = torch.zeros(256, 256, dtype=dtype)
    out["project_hid.weight"] = torch.zeros(256, hidden, dtype=dtype)
    return out
