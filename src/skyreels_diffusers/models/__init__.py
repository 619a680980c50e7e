from . import attention_backends  # noqa: F401  (registers the 'fa3', 'fa3_fp8' and 'triton_8bit' attention backends)
from .attention_processor import (
    SkyReelsV3Attention,
    SkyReelsV3AttnProcessor,
    SkyReelsV3AudioAttention,
    SkyReelsV3AudioAttnProcessor,
)
from .audio_projection import SkyReelsV3AudioProjection
from .transformer_skyreels_v3 import SkyReelsV3Transformer3DModel, SkyReelsV3TransformerBlock


__all__ = [
    "SkyReelsV3Attention",
    "SkyReelsV3AttnProcessor",
    "SkyReelsV3AudioAttention",
    "SkyReelsV3AudioAttnProcessor",
    "SkyReelsV3AudioProjection",
    "SkyReelsV3Transformer3DModel",
    "SkyReelsV3TransformerBlock",
]
