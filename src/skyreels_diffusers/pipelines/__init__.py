from .common import SkyReelsV3PipelineOutput
from .pipeline_skyreels_v3_extension import SkyReelsV3ExtensionPipeline
from .pipeline_skyreels_v3_reference import SkyReelsV3ReferencePipeline
from .pipeline_skyreels_v3_shot_switching import SkyReelsV3ShotSwitchingPipeline
from .pipeline_skyreels_v3_talking_avatar import SkyReelsV3AvatarPipelineOutput, SkyReelsV3TalkingAvatarPipeline


__all__ = [
    "SkyReelsV3ExtensionPipeline",
    "SkyReelsV3PipelineOutput",
    "SkyReelsV3ReferencePipeline",
    "SkyReelsV3ShotSwitchingPipeline",
    "SkyReelsV3AvatarPipelineOutput",
    "SkyReelsV3TalkingAvatarPipeline",
]
