"""Loading weights from the files users have: original single files and shards, community GGUFs, ComfyUI / kijai
scaled-FP8 files and component files (and whole pipelines from them), the original repositories' components, and
converted pipeline folders (strictly). Below the models, as diffusers' `loaders/`:
nothing here imports a model; the model class comes in as an argument (or through `SkyReelsV3SingleFileMixin`)."""

from .comfyui import MissingComponentsError, load_pipeline_from_files
from .component_files import load_audio_encoder_file, load_image_encoder_file, load_text_encoder_file, load_vae_file
from .components import convert_clip, convert_t5, convert_wan_vae, load_wav2vec2
from .pipeline_folder import load_pipeline_folder, read_model_index
from .single_file import SkyReelsV3SingleFileMixin, detect_variant, load_transformer_single_file
from .transformer_conversion import (
    DIFFUSERS_KEY_MAP,
    KEY_MAPS,
    VARIANT_LAYOUT,
    WAN_NATIVE_KEY_MAP,
    convert_config,
    map_keys,
)


__all__ = [
    "DIFFUSERS_KEY_MAP",
    "KEY_MAPS",
    "MissingComponentsError",
    "VARIANT_LAYOUT",
    "WAN_NATIVE_KEY_MAP",
    "SkyReelsV3SingleFileMixin",
    "convert_clip",
    "convert_config",
    "convert_t5",
    "convert_wan_vae",
    "detect_variant",
    "load_audio_encoder_file",
    "load_image_encoder_file",
    "load_pipeline_folder",
    "load_pipeline_from_files",
    "load_text_encoder_file",
    "load_vae_file",
    "load_transformer_single_file",
    "load_wav2vec2",
    "map_keys",
    "read_model_index",
]
