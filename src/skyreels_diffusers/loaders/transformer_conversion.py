"""Original SkyReels-V3 transformer checkpoints -> the keys and config of `SkyReelsV3Transformer3DModel`.

Key maps are data: ordered `(pattern, target)` rules matched with `re.fullmatch` against each original key. A
target is a replacement string, or a tuple of replacement strings meaning "chunk the tensor into that many equal
parts along dim 0" (the avatar's fused audio key/value projection). One function applies a table; a key that no
rule matches is an error, and so is a converted key set that differs from what the model expects.

Conversion streams tensor by tensor (`tensor_io`): a 19B checkpoint never sits in RAM, whatever its size; `.pth`
files are read by an unpickler that allows only tensor-rebuilding globals.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch


_B = r"blocks\.(\d+)\."

# Wan-native (extension, shot switching, talking avatar) -> ours.
WAN_NATIVE_KEY_MAP: list[tuple[str, str | tuple[str, ...]]] = [
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"text_embedding\.0\.(weight|bias)", r"condition_embedder.text_embedder.linear_1.\1"),
    (r"text_embedding\.2\.(weight|bias)", r"condition_embedder.text_embedder.linear_2.\1"),
    (r"time_embedding\.0\.(weight|bias)", r"condition_embedder.time_embedder.linear_1.\1"),
    (r"time_embedding\.2\.(weight|bias)", r"condition_embedder.time_embedder.linear_2.\1"),
    (r"time_projection\.1\.(weight|bias)", r"condition_embedder.time_proj.\1"),
    (r"img_emb\.proj\.0\.(weight|bias)", r"condition_embedder.image_embedder.norm1.\1"),
    (r"img_emb\.proj\.1\.(weight|bias)", r"condition_embedder.image_embedder.ff.net.0.proj.\1"),
    (r"img_emb\.proj\.3\.(weight|bias)", r"condition_embedder.image_embedder.ff.net.2.\1"),
    (r"img_emb\.proj\.4\.(weight|bias)", r"condition_embedder.image_embedder.norm2.\1"),
    (_B + r"modulation", r"blocks.\1.scale_shift_table"),
    (_B + r"self_attn\.q\.(weight|bias)", r"blocks.\1.attn1.to_q.\2"),
    (_B + r"self_attn\.k\.(weight|bias)", r"blocks.\1.attn1.to_k.\2"),
    (_B + r"self_attn\.v\.(weight|bias)", r"blocks.\1.attn1.to_v.\2"),
    (_B + r"self_attn\.o\.(weight|bias)", r"blocks.\1.attn1.to_out.0.\2"),
    (_B + r"self_attn\.norm_(q|k)\.weight", r"blocks.\1.attn1.norm_\2.weight"),
    (_B + r"norm3\.(weight|bias)", r"blocks.\1.norm2.\2"),  # affine cross-attention norm
    (_B + r"cross_attn\.q\.(weight|bias)", r"blocks.\1.attn2.to_q.\2"),
    (_B + r"cross_attn\.k\.(weight|bias)", r"blocks.\1.attn2.to_k.\2"),
    (_B + r"cross_attn\.v\.(weight|bias)", r"blocks.\1.attn2.to_v.\2"),
    (_B + r"cross_attn\.o\.(weight|bias)", r"blocks.\1.attn2.to_out.0.\2"),
    (_B + r"cross_attn\.norm_(q|k)\.weight", r"blocks.\1.attn2.norm_\2.weight"),
    (_B + r"cross_attn\.k_img\.(weight|bias)", r"blocks.\1.attn2.add_k_proj.\2"),
    (_B + r"cross_attn\.v_img\.(weight|bias)", r"blocks.\1.attn2.add_v_proj.\2"),
    (_B + r"cross_attn\.norm_k_img\.weight", r"blocks.\1.attn2.norm_added_k.weight"),
    (_B + r"ffn\.0\.(weight|bias)", r"blocks.\1.ffn.net.0.proj.\2"),
    (_B + r"ffn\.2\.(weight|bias)", r"blocks.\1.ffn.net.2.\2"),
    (_B + r"norm_x\.(weight|bias)", r"blocks.\1.norm_audio.\2"),
    (_B + r"audio_cross_attn\.q_linear\.(weight|bias)", r"blocks.\1.attn_audio.to_q.\2"),
    (
        _B + r"audio_cross_attn\.kv_linear\.(weight|bias)",
        (r"blocks.\1.attn_audio.to_k.\2", r"blocks.\1.attn_audio.to_v.\2"),
    ),
    (_B + r"audio_cross_attn\.proj\.(weight|bias)", r"blocks.\1.attn_audio.to_out.0.\2"),
    (r"audio_proj\.proj1\.(weight|bias)", r"audio_proj.linear_first.\1"),
    (r"audio_proj\.proj1_vf\.(weight|bias)", r"audio_proj.linear_latter.\1"),
    (r"audio_proj\.proj2\.(weight|bias)", r"audio_proj.linear_2.\1"),
    (r"audio_proj\.proj3\.(weight|bias)", r"audio_proj.linear_3.\1"),
    (r"audio_proj\.norm\.(weight|bias)", r"audio_proj.norm_out.\1"),
    (r"head\.head\.(weight|bias)", r"proj_out.\1"),
    (r"head\.modulation", r"scale_shift_table"),
]

# diffusers-layout reference-to-video checkpoint (a copy of diffusers 0.34 `WanTransformer3DModel`): the names are
# already ours; the table only documents (and checks) which keys exist.
DIFFUSERS_KEY_MAP: list[tuple[str, str | tuple[str, ...]]] = [
    (
        r"(patch_embedding|proj_out|condition_embedder\.(?:time_embedder\.linear_[12]|time_proj|"
        r"text_embedder\.linear_[12]))\.(weight|bias)",
        r"\1.\2",
    ),
    (r"scale_shift_table", r"scale_shift_table"),
    (r"condition_embedder\.image_embedder\.(norm1|norm2|ff\.net\.0\.proj|ff\.net\.2)\.(weight|bias)", r"\g<0>"),
    (_B + r"scale_shift_table", r"\g<0>"),
    (_B + r"attn[12]\.(to_q|to_k|to_v|to_out\.0|add_k_proj|add_v_proj)\.(weight|bias)", r"\g<0>"),
    (_B + r"attn[12]\.(norm_q|norm_k|norm_added_k)\.weight", r"\g<0>"),
    (_B + r"norm2\.(weight|bias)", r"\g<0>"),
    (_B + r"ffn\.net\.(0\.proj|2)\.(weight|bias)", r"\g<0>"),
]

KEY_MAPS = {"wan": WAN_NATIVE_KEY_MAP, "diffusers": DIFFUSERS_KEY_MAP}
VARIANT_LAYOUT = {"reference": "diffusers", "extension": "wan", "avatar": "wan"}
#: variant -> the original config's `model_type` ("i2v": the avatar, with its CLIP, audio projection and audio fields)
VARIANT_MODEL_TYPE = {"reference": "t2v", "extension": "t2v", "avatar": "i2v"}


@dataclass(frozen=True)
class MappedKey:
    source: str
    target: str
    chunk: int  # index of this target's chunk along dim 0
    num_chunks: int

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This target's part of the source tensor."""
        if self.num_chunks == 1:
            return tensor
        if tensor.shape[0] % self.num_chunks:
            raise ValueError(f"{self.source} of shape {tuple(tensor.shape)} cannot be split in {self.num_chunks}")
        return tensor.chunk(self.num_chunks, dim=0)[self.chunk]


KeyMap = list[tuple[str, "str | tuple[str, ...] | None"]]


def map_keys(keys: list[str], key_map: KeyMap) -> list[MappedKey]:
    """Apply a key table to original key names: each key's first matching rule gives its new name (a tuple of names
    splits the tensor into equal chunks along dim 0; `None` drops the key). Raises `KeyError` listing every key no
    rule matches."""
    compiled = [(re.compile(pattern), target) for pattern, target in key_map]
    mapped, unknown = [], []
    for key in keys:
        for pattern, target in compiled:
            match = pattern.fullmatch(key)
            if match is None:
                continue
            if target is not None:
                targets = target if isinstance(target, tuple) else (target,)
                mapped.extend(MappedKey(key, match.expand(t), i, len(targets)) for i, t in enumerate(targets))
            break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} original key(s) match no conversion rule: {sorted(unknown)}")
    return mapped


def rename_state_dict(state: dict[str, torch.Tensor], key_map: KeyMap, what: str) -> dict[str, torch.Tensor]:
    """Apply a key table to a whole state dict (components small enough to hold in memory, e.g. T5, CLIP)."""
    try:
        mapped = map_keys(list(state), key_map)
    except KeyError as error:
        raise KeyError(f"{what}: {error.args[0]}") from None
    return {item.target: item.take(state[item.source]) for item in mapped}


# --------------------------------------------------------------------------------------------- configs

# Fields of the Wan-native config.json and what becomes of them. The original's `from_config` ignores
# `patch_size`, `cross_attn_norm`, `qk_norm`, `text_dim`, `window_size` (always the defaults); we read them all.
_WAN_IGNORED_FIELDS = {"_class_name", "_diffusers_version", "__module__", "text_len", "_name_or_path"}
_WAN_AUDIO_FIELDS = {
    "audio_window": "audio_window",
    "intermediate_dim": "audio_intermediate_dim",
    "output_dim": "audio_dim",
    "context_tokens": "audio_context_tokens",
    "vae_scale": "audio_vae_scale",
    "norm_input_visual": "audio_norm_input",
    "norm_output_audio": "audio_norm_output",
}
# Original avatar defaults (the constructor's), used when an avatar config.json leaves a field out.
_WAN_AVATAR_DEFAULTS = {
    "audio_window": 5,
    "intermediate_dim": 512,
    "output_dim": 768,
    "context_tokens": 32,
    "vae_scale": 4,
    "norm_input_visual": True,
    "norm_output_audio": True,
}
# wav2vec2 width and layer count are hard-coded in the original AudioProjModel, as is the CLIP width.
WAV2VEC2_DIM, WAV2VEC2_LAYERS, CLIP_DIM = 768, 12, 1280


def convert_wan_config(original: dict, variant: str) -> dict:
    """Wan-native `config.json` (extension / avatar `WanModel`) -> our config."""
    known = {
        "model_type",
        "patch_size",
        "in_dim",
        "dim",
        "ffn_dim",
        "freq_dim",
        "text_dim",
        "out_dim",
        "num_heads",
        "num_layers",
        "window_size",
        "qk_norm",
        "cross_attn_norm",
        "eps",
        *_WAN_AUDIO_FIELDS,
    }
    unknown = sorted(set(original) - known - _WAN_IGNORED_FIELDS)
    if unknown:
        raise ValueError(f"Unknown field(s) in the original config.json: {unknown}")
    model_type = original.get("model_type", "t2v")
    expected_type = VARIANT_MODEL_TYPE[variant]
    if model_type != expected_type:
        raise ValueError(f"variant {variant!r} expects model_type {expected_type!r}, the config says {model_type!r}")
    if tuple(original.get("window_size", (-1, -1))) != (-1, -1):
        raise ValueError(f"Only global attention is supported, config has window_size={original['window_size']}")
    if not original.get("qk_norm", True):
        raise ValueError("Only qk_norm=True checkpoints are supported.")
    dim, heads = original.get("dim", 2048), original.get("num_heads", 16)
    if dim % heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {heads}")
    config = {
        "patch_size": list(original.get("patch_size", (1, 2, 2))),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": original.get("in_dim", 16),
        "out_channels": original.get("out_dim", 16),
        "text_dim": original.get("text_dim", 4096),
        "freq_dim": original.get("freq_dim", 256),
        "ffn_dim": original.get("ffn_dim", 8192),
        "num_layers": original.get("num_layers", 32),
        "cross_attn_norm": original.get("cross_attn_norm", True),
        "qk_norm": "rms_norm_across_heads",
        "eps": original.get("eps", 1e-6),
    }
    if expected_type == "i2v":
        config.update(
            image_dim=CLIP_DIM, added_kv_proj_dim=dim, audio_in_dim=WAV2VEC2_DIM, audio_in_layers=WAV2VEC2_LAYERS
        )
        for field, ours in _WAN_AUDIO_FIELDS.items():
            config[ours] = original.get(field, _WAN_AVATAR_DEFAULTS[field])
    elif any(field in original for field in _WAN_AUDIO_FIELDS):
        raise ValueError(f"Audio fields in a {variant!r} config: {sorted(set(original) & set(_WAN_AUDIO_FIELDS))}")
    return config


_DIFFUSERS_FIELDS = {
    "patch_size",
    "num_attention_heads",
    "attention_head_dim",
    "in_channels",
    "out_channels",
    "text_dim",
    "freq_dim",
    "ffn_dim",
    "num_layers",
    "cross_attn_norm",
    "qk_norm",
    "eps",
    "image_dim",
    "added_kv_proj_dim",
}


def convert_diffusers_config(original: dict) -> dict:
    """diffusers-layout `transformer/config.json` (reference-to-video) -> our config."""
    ignored = {"_class_name", "_diffusers_version", "_name_or_path", "rope_max_seq_len"}
    unknown = sorted(set(original) - _DIFFUSERS_FIELDS - ignored - {"pos_embed_seq_len"})
    if unknown:
        raise ValueError(f"Unknown field(s) in the original config.json: {unknown}")
    if original.get("pos_embed_seq_len") is not None:
        raise ValueError("pos_embed_seq_len (FLF2V) is not part of any SkyReels-V3 checkpoint.")
    config = {k: v for k, v in original.items() if k in _DIFFUSERS_FIELDS}
    if "patch_size" in config:
        config["patch_size"] = list(config["patch_size"])
    return config


def convert_config(original: dict, variant: str) -> dict:
    if variant not in VARIANT_LAYOUT:
        raise ValueError(f"variant must be one of {sorted(VARIANT_LAYOUT)}, got {variant!r}")
    if VARIANT_LAYOUT[variant] == "wan":
        return convert_wan_config(original, variant)
    return convert_diffusers_config(original)


# --------------------------------------------------------------------------------------------- tensors


def expected_state_shapes(model_class: type, config: dict) -> dict[str, tuple[int, ...]]:
    """Every key a `model_class` with `config` expects and its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = model_class.from_config(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_mapped_keys(mapped: list[MappedKey], expected: set[str], what: str, variant: str) -> None:
    """Strictness: the converted key set must be exactly the model's (no missing, unexpected or duplicated key)."""
    produced = [m.target for m in mapped]
    duplicates = sorted(k for k, n in Counter(produced).items() if n > 1)
    missing, unexpected = sorted(expected - set(produced)), sorted(set(produced) - expected)
    if missing or unexpected or duplicates:
        raise KeyError(
            f"Checkpoint {what} does not match the {variant!r} model: missing keys {missing}, unexpected keys "
            f"{unexpected}, duplicated keys {duplicates}"
        )
