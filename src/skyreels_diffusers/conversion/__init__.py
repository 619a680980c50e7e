"""Original SkyReels-V3 checkpoints -> diffusers layout (used by `scripts/convert_checkpoints.py`)."""

from .repo import convert_repo
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
    "convert_config",
    "convert_repo",
    "convert_transformer",
    "map_keys",
]
