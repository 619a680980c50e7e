"""Original SkyReels-V3 checkpoints -> diffusers layout (used by `scripts/convert_checkpoints.py`)."""

from .repo import convert_clip, convert_repo, convert_t5, convert_wan_vae
from .single_file import detect_variant, load_transformer_single_file
from .transformer import (
    DIFFUSERS_KEY_MAP,
    KEY_MAPS,
    VARIANT_LAYOUT,
    WAN_NATIVE_KEY_MAP,
    convert_config,
    convert_transformer,
    map_keys,
)


__all__ = [
    "DIFFUSERS_KEY_MAP",
    "KEY_MAPS",
    "VARIANT_LAYOUT",
    "WAN_NATIVE_KEY_MAP",
    "convert_clip",
    "convert_config",
    "convert_repo",
    "convert_t5",
    "convert_wan_vae",
    "detect_variant",
    "load_transformer_single_file",
    "convert_transformer",
    "map_keys",
]
