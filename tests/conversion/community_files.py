"""Checkpoints in the layouts users download, built offline for the single-file / GGUF tests.

* `wan_native_state(model)`: our extension model's weights under the original Wan-native names (an inverse table
  written here from the original module structure, independent of the converter's).
* `write_community_gguf(path, state, qtype)`: a GGUF file laid out like city96's Wan conversions
  (`general.architecture = "wan"`, original names, vectors / small tensors / `.modulation` in F32, the 5-D patch
  embedding in F32, the other tensors in `qtype`). Q8_0, Q5_x and Q4_x are quantised with `gguf.quants`; the
  package cannot quantise K-quants, so K-quant tensors get random blocks with sane scales (a valid file all the
  same). Returns, per tensor, the weights the file decodes to (numpy reference dequantisation of `gguf`).
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import torch


T = gguf.GGMLQuantizationType
K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)

_OURS_TO_WAN = [
    (
        r"condition_embedder\.text_embedder\.linear_([12])\.(.*)",
        lambda m: f"text_embedding.{2 * int(m[1]) - 2}.{m[2]}",
    ),
    (
        r"condition_embedder\.time_embedder\.linear_([12])\.(.*)",
        lambda m: f"time_embedding.{2 * int(m[1]) - 2}.{m[2]}",
    ),
    (r"condition_embedder\.time_proj\.(.*)", r"time_projection.1.\1"),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    (r"blocks\.(\d+)\.attn1\.to_(q|k|v)\.(.*)", r"blocks.\1.self_attn.\2.\3"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0\.(.*)", r"blocks.\1.self_attn.o.\2"),
    (r"blocks\.(\d+)\.attn1\.norm_(q|k)\.weight", r"blocks.\1.self_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.norm2\.(.*)", r"blocks.\1.norm3.\2"),
    (r"blocks\.(\d+)\.attn2\.to_(q|k|v)\.(.*)", r"blocks.\1.cross_attn.\2.\3"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0\.(.*)", r"blocks.\1.cross_attn.o.\2"),
    (r"blocks\.(\d+)\.attn2\.norm_(q|k)\.weight", r"blocks.\1.cross_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.(.*)", r"blocks.\1.ffn.0.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.2\.(.*)", r"blocks.\1.ffn.2.\2"),
    (r"proj_out\.(.*)", r"head.head.\1"),
    (r"scale_shift_table", r"head.modulation"),
    (r"patch_embedding\.(.*)", r"patch_embedding.\1"),
    # talking avatar: CLIP tokens, image keys/values, audio projection and audio cross-attention
    (r"condition_embedder\.image_embedder\.norm1\.(.*)", r"img_emb.proj.0.\1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj\.(.*)", r"img_emb.proj.1.\1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2\.(.*)", r"img_emb.proj.3.\1"),
    (r"condition_embedder\.image_embedder\.norm2\.(.*)", r"img_emb.proj.4.\1"),
    (r"blocks\.(\d+)\.attn2\.add_(k|v)_proj\.(.*)", r"blocks.\1.cross_attn.\2_img.\3"),
    (r"blocks\.(\d+)\.attn2\.norm_added_k\.weight", r"blocks.\1.cross_attn.norm_k_img.weight"),
    (r"blocks\.(\d+)\.norm_audio\.(.*)", r"blocks.\1.norm_x.\2"),
    (r"blocks\.(\d+)\.attn_audio\.to_q\.(.*)", r"blocks.\1.audio_cross_attn.q_linear.\2"),
    (r"blocks\.(\d+)\.attn_audio\.to_out\.0\.(.*)", r"blocks.\1.audio_cross_attn.proj.\2"),
    (r"audio_proj\.linear_first\.(.*)", r"audio_proj.proj1.\1"),
    (r"audio_proj\.linear_latter\.(.*)", r"audio_proj.proj1_vf.\1"),
    (r"audio_proj\.linear_([23])\.(.*)", r"audio_proj.proj\1.\2"),
    (r"audio_proj\.norm_out\.(.*)", r"audio_proj.norm.\1"),
]
_FUSED_AUDIO_KV = r"blocks\.(\d+)\.attn_audio\.to_(k|v)\.(.*)"  # to_k and to_v -> one kv_linear (k rows first)


def wan_native_state(model: torch.nn.Module | dict) -> dict[str, torch.Tensor]:
    """An extension or avatar model's weights (or state dict) under the original Wan-native names."""
    out, state = {}, model if isinstance(model, dict) else model.state_dict()
    for key, tensor in state.items():
        fused = re.fullmatch(_FUSED_AUDIO_KV, key)
        if fused:
            if fused[2] == "k":
                value = state[key.replace(".to_k.", ".to_v.")]
                out[f"blocks.{fused[1]}.audio_cross_attn.kv_linear.{fused[3]}"] = torch.cat([tensor, value]).clone()
            continue
        for pattern, target in _OURS_TO_WAN:
            m = re.fullmatch(pattern, key)
            if m:
                out[m.expand(target) if isinstance(target, str) else target(m)] = tensor.detach().clone()
                break
        else:
            raise KeyError(key)
    return out


def _random_k_blocks(shape: tuple[int, ...], qtype, rng: np.random.Generator) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = np.full((rows, cols // block), 2e-3, dtype=np.float16).view(np.uint8).reshape(rows, cols // block, 2)
    if qtype in (T.Q4_K, T.Q5_K):  # d, dmin first
        raw[..., 0:2], raw[..., 2:4] = scale, (scale.view(np.float16) / 2).view(np.uint8)
    elif qtype == T.Q2_K:  # ... d, dmin last
        raw[..., -4:-2], raw[..., -2:] = scale, (scale.view(np.float16) / 2).view(np.uint8)
    else:  # Q3_K, Q6_K: d last
        raw[..., -2:] = scale
    return raw.reshape(rows, -1)


def community_qtype(key: str, shape: tuple[int, ...], qtype):
    """The type city96's script + llama.cpp's quantiser give a tensor: F32 for vectors, tiny tensors and the
    modulation tables, the 5-D patch embedding in F32 (added back by the 5-D fix), F16 for rows not filling whole
    blocks, `qtype` otherwise."""
    if len(shape) <= 1 or int(np.prod(shape)) <= 1024 or "modulation" in key or "scale_shift_table" in key:
        return T.F32
    if len(shape) > 4:
        return T.F32
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:  # rows that do not fill whole blocks fall back to F16
        return T.F16
    return qtype


def write_community_gguf(
    path: Path, state: dict[str, torch.Tensor], qtype, architecture: str = "wan", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Write `state` as a community-layout GGUF file; returns what each tensor decodes to (float32)."""
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch=architecture)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    decoded = {}
    for key, tensor in state.items():
        data = tensor.float().numpy()
        kind = community_qtype(key, data.shape, qtype)
        if kind in K_QUANTS:
            raw = _random_k_blocks(data.shape, kind, rng)
        else:
            raw = gguf.quants.quantize(data, kind)
        decoded[key] = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, kind), dtype=np.float32)).reshape(
            data.shape
        )
        writer.add_tensor(key, raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return decoded
