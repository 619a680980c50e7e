"""skyreels-diffusers: SkyReels-V3 video generation as diffusers pipelines."""

__version__ = "0.1.0"

from .models import SkyReelsV3Transformer3DModel  # noqa: E402

__all__ = ["SkyReelsV3Transformer3DModel", "__version__"]
