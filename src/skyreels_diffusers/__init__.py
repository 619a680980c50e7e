"""skyreels-diffusers: SkyReels-V3 video generation as diffusers pipelines."""

import logging as _logging


# torchao (imported by diffusers) registers pytree constants and torch logs a deprecation for each; harmless noise.
_logging.getLogger("torch.utils._pytree").setLevel(_logging.ERROR)

from ._quiet import silence_known_noise  # noqa: E402


silence_known_noise()  # torchao's CUDA-kernel load failures on CPU-only machines (see _quiet.py)

__version__ = "0.1.0"

from .models import SkyReelsV3Transformer3DModel  # noqa: E402
from .pipelines import (  # noqa: E402
    SkyReelsV3ExtensionPipeline,
    SkyReelsV3PipelineOutput,
    SkyReelsV3ReferencePipeline,
    SkyReelsV3ShotSwitchingPipeline,
    SkyReelsV3TalkingAvatarPipeline,
)
from .schedulers import SkyReelsV3FlowEulerScheduler, SkyReelsV3FlowUniPCScheduler  # noqa: E402


def _register_with_diffusers() -> None:
    """Make `DiffusionPipeline.from_pretrained(folder)` resolve our `_class_name`s (diffusers looks pipeline classes
    up on its own module). Only names diffusers does not define are added; nothing of diffusers is replaced."""
    import diffusers

    for cls in (
        SkyReelsV3ReferencePipeline,
        SkyReelsV3ExtensionPipeline,
        SkyReelsV3ShotSwitchingPipeline,
        SkyReelsV3TalkingAvatarPipeline,
        SkyReelsV3Transformer3DModel,
        SkyReelsV3FlowEulerScheduler,
        SkyReelsV3FlowUniPCScheduler,
    ):
        if not hasattr(diffusers, cls.__name__):
            setattr(diffusers, cls.__name__, cls)


_register_with_diffusers()

__all__ = [
    "SkyReelsV3ExtensionPipeline",
    "SkyReelsV3PipelineOutput",
    "SkyReelsV3ReferencePipeline",
    "SkyReelsV3ShotSwitchingPipeline",
    "SkyReelsV3TalkingAvatarPipeline",
    "SkyReelsV3FlowEulerScheduler",
    "SkyReelsV3FlowUniPCScheduler",
    "SkyReelsV3Transformer3DModel",
    "__version__",
]
