"""A whole pipeline from single component files: a ComfyUI `models` folder, explicit files, or both.

ComfyUI keeps each kind of file in its own folder of `models/`: `diffusion_models/` (or `unet/`), `text_encoders/`
(or `clip/`), `vae/`, `clip_vision/` and `wav2vec2/`. Each component the pipeline class needs is taken from:

1. an explicit argument: an object (used as it is), or a path (a bare file name is looked up in its ComfyUI folder);
2. else the ComfyUI folder: the one file there whose tensor names have that component's layout (read from the file
   header only). Several candidates are an error listing them; the transformer is never guessed (two files of the
   same layout, e.g. single-shot and shot-switching transformers, would be indistinguishable), it must be named.

What the files do not carry: the tokenizer (ComfyUI's UMT5 files hold no usable tokenizer) comes from `tokenizer=`:
a tokenizer, a folder (a converted pipeline folder's `tokenizer/`, the original repository's `google/umt5-xxl/`) or a
Hub id (`"google/umt5-xxl"`, the original's tokenizer, is the default; cached or downloaded); the scheduler is the
caller's (`scheduler=`: its shift is a fact of the task); configurations are read off the tensors (`configs=` may
give any component's). Everything missing is reported at once in one `MissingComponentsError`, before any weight is
read. The library imports no task registry: the pipeline class tells which components it needs.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError


#: component -> its folders in a ComfyUI `models` folder
COMFYUI_FOLDERS = {
    "transformer": ("diffusion_models", "unet"),
    "text_encoder": ("text_encoders", "clip"),
    "vae": ("vae",),
    "image_encoder": ("clip_vision",),
    "audio_encoder": ("wav2vec2",),
}
# component -> tensor names telling its layout (any one suffices; a ComfyUI / `wav2vec2.` prefix is allowed)
LAYOUT_KEYS = {
    "text_encoder": (
        "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",  # UMT5: a bias table per block
        "blocks.1.pos_embedding.embedding.weight",  # Wan-native UMT5
    ),
    "vae": ("decoder.middle.0.residual.0.gamma", "decoder.mid_block.resnets.0.norm1.gamma"),
    "image_encoder": (
        "vision_model.encoder.layers.0.layer_norm1.weight",
        "visual.transformer.resblocks.0.attn.in_proj_weight",
        "visual.transformer.0.attn.to_qkv.weight",
    ),
    "audio_encoder": ("feature_projection.projection.weight",),
}
DEFAULT_TOKENIZER = "google/umt5-xxl"
DEFAULT_DTYPES = {"default": torch.bfloat16, "vae": torch.float32, "audio_encoder": torch.float32}
FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt", ".gguf")


class MissingComponentsError(ValueError):
    """Components that could not be found or told apart: `missing` maps each name to the reason."""

    def __init__(self, pipeline_class: type, missing: dict[str, str]):
        self.missing = missing
        lines = "".join(f"\n  {name}: {reason}" for name, reason in missing.items())
        super().__init__(f"{pipeline_class.__name__} needs these components:{lines}")


def pipeline_components(pipeline_class: type) -> list[str]:
    """The components a pipeline class takes (its `__init__` arguments)."""
    return [name for name in inspect.signature(pipeline_class.__init__).parameters if name != "self"]


def file_keys(path: Path) -> set[str]:
    """Tensor names of a weight file, from its header (no tensor read)."""
    from .tensor_io import file_index

    try:
        return set(file_index(path))
    except (ValueError, KeyError, OSError):
        return set()


def has_layout(keys: set[str], component: str) -> bool:
    return any(key.endswith(anchor) for key in keys for anchor in LAYOUT_KEYS[component])


def _candidates(models_dir: Path, component: str) -> list[Path]:
    files = []
    for folder in COMFYUI_FOLDERS[component]:
        if (models_dir / folder).is_dir():
            files += sorted(p for p in (models_dir / folder).rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file())
    return files


def find_component_file(models_dir: Path | None, component: str, given: Any) -> tuple[Path | None, str]:
    """(the file for `component`, or None and why not) from an explicit path or the ComfyUI folder."""
    subfolders = COMFYUI_FOLDERS[component]
    where = " or ".join(f"{models_dir / f}/" if models_dir else f"models/{f}/" for f in subfolders)
    if given is not None:
        path = Path(given)
        if not path.exists() and models_dir is not None and len(path.parts) == 1:
            path = next((f for f in _candidates(models_dir, component) if f.name == path.name), path)
        return (path, "") if path.exists() else (None, f"{given}: no such file (nor in {where})")
    if models_dir is None:
        return None, "no file given"
    candidates = _candidates(models_dir, component)
    if component == "transformer":
        names = ", ".join(p.name for p in candidates) or "none there"
        return None, f"name the transformer file ({where}: {names})"
    matching = [p for p in candidates if has_layout(file_keys(p), component)]
    if len(matching) == 1:
        return matching[0], ""
    if not matching:
        return None, f"no file of its layout in {where}"
    return None, f"several candidates, name one: {', '.join(str(p.relative_to(models_dir)) for p in matching)}"


def _load_tokenizer(tokenizer: Any):
    from transformers import AutoTokenizer

    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = Path(tokenizer)
    path = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    return AutoTokenizer.from_pretrained(path if path.exists() else str(tokenizer))


def _is_object(value) -> bool:
    """A component given as it is (not a path to load, not absent)."""
    return value is not None and not isinstance(value, (str, os.PathLike))


def _model_classes(pipeline_class: type) -> dict[str, type]:
    import typing

    return {k: v for k, v in typing.get_type_hints(pipeline_class.__init__).items() if isinstance(v, type)}


def find_component_files(
    pipeline_class: type, models_dir: Path | None, components: dict, skip=()
) -> tuple[dict[str, Path], dict[str, str]]:
    """({component: file}, {component: why missing}) for the pipeline's weight components (transformer and
    encoders) not given as objects nor skipped; reads file headers only."""
    files, missing = {}, {}
    for name in pipeline_components(pipeline_class):
        value = components.get(name)
        if name not in COMFYUI_FOLDERS or name in skip:
            continue
        if _is_object(value):
            continue
        path, reason = find_component_file(models_dir, name, value)
        if path is None:
            missing[name] = reason
        else:
            files[name] = path
    return files, missing


def _resolve(pipeline_class, models_dir, components: dict, tokenizer, skip) -> tuple[dict, dict, dict]:
    """(objects given, {component: file}, {component: why missing}) for every component of the pipeline."""
    files, missing = find_component_files(pipeline_class, models_dir, components, skip)
    ready = {}
    for name in pipeline_components(pipeline_class):
        value = components.get(name)
        if name in skip:
            ready[name] = None
        elif _is_object(value):
            ready[name] = value
        elif name == "tokenizer":
            try:
                ready[name] = _load_tokenizer(value or tokenizer)
            except (OSError, ValueError) as error:
                missing[name] = (
                    f"cannot load {value or tokenizer!r} ({str(error).splitlines()[0]}); pass tokenizer= a folder "
                    "(a converted pipeline folder's tokenizer/, the original repository's google/umt5-xxl/)"
                )
        elif name == "scheduler":
            missing[name] = "pass scheduler= (the task's flow scheduler, with its shift)"
        elif name == "feature_extractor" and isinstance(components.get("audio_encoder"), torch.nn.Module):
            missing[name] = "pass feature_extractor= with the audio encoder object (its file brings one)"
    return ready, files, missing


def _check_transformer_fits(pipeline_class: type, transformer, path: Path, needs_audio: bool) -> None:
    has_audio = getattr(transformer.config, "audio_in_dim", None) is not None
    if has_audio != needs_audio:
        kind = "a talking-avatar (audio)" if has_audio else "a video (no audio)"
        raise ValueError(f"transformer {path}: holds {kind} transformer, which {pipeline_class.__name__} cannot use")


def _load_file(name: str, cls: type, path: Path, dtype, keep_fp8: bool, config, variant) -> dict:
    from .component_files import (
        load_audio_encoder_file,
        load_image_encoder_file,
        load_text_encoder_file,
        load_vae_file,
    )

    if name == "transformer":
        kwargs = {"quantization_config": _gguf_config(dtype)} if path.suffix == ".gguf" else {"keep_fp8": keep_fp8}
        return {name: cls.from_single_file(path, variant=variant, config=config, torch_dtype=dtype, **kwargs)}
    if name == "text_encoder":
        return {name: load_text_encoder_file(path, dtype, keep_fp8=keep_fp8, config=config)}
    if name == "vae":
        return {name: load_vae_file(path, dtype, config=config)}
    if name == "image_encoder":
        return {name: load_image_encoder_file(path, dtype, config=config)}
    audio_encoder, feature_extractor = load_audio_encoder_file(path, config=config)
    return {name: audio_encoder.to(dtype), "feature_extractor": feature_extractor}


def _gguf_config(dtype):
    from diffusers import GGUFQuantizationConfig

    return GGUFQuantizationConfig(compute_dtype=dtype)


def load_pipeline_from_files(
    pipeline_class: type,
    models_dir: str | os.PathLike | None = None,
    *,
    tokenizer: Any = DEFAULT_TOKENIZER,
    torch_dtype: torch.dtype | dict[str, torch.dtype] | None = None,
    keep_fp8: bool = True,
    configs: dict[str, Any] | None = None,
    transformer_variant: str | None = None,
    skip: tuple[str, ...] = (),
    **components,
):
    """Build `pipeline_class` from component files (see the module docstring); `components`: `transformer=`,
    `text_encoder=`, `vae=`, `image_encoder=`, `audio_encoder=` (paths, or objects used as they are),
    `scheduler=` (required), `feature_extractor=`. `torch_dtype`: one dtype or {component: dtype, "default": ...}
    (default: bf16, the VAE and wav2vec2 in float32). `keep_fp8`: FP8-scaled files stay FP8. `skip`: components
    left None (e.g. the encoders on the ranks that do not run them)."""
    names = pipeline_components(pipeline_class)
    unknown = sorted(set(components) - set(names))
    if unknown:
        raise TypeError(f"{pipeline_class.__name__} has no component(s) {unknown}; it takes {names}")
    models_dir = Path(models_dir) if models_dir is not None else None
    if models_dir is not None and not models_dir.is_dir():
        raise FileNotFoundError(f"models folder {models_dir} does not exist")
    ready, files, missing = _resolve(pipeline_class, models_dir, components, tokenizer, set(skip))
    if missing:
        raise MissingComponentsError(pipeline_class, missing)
    dtypes = DEFAULT_DTYPES if torch_dtype is None else torch_dtype
    dtypes = dtypes if isinstance(dtypes, dict) else {"default": dtypes}
    classes, configs = _model_classes(pipeline_class), configs or {}
    for name in sorted(files, key=lambda n: n != "transformer"):  # the transformer first: its check fails fast
        dtype = dtypes.get(name, dtypes.get("default", torch.bfloat16))
        try:
            loaded = _load_file(
                name, classes.get(name), files[name], dtype, keep_fp8, configs.get(name), transformer_variant
            )
            if name == "transformer":
                _check_transformer_fits(pipeline_class, loaded[name], files[name], "audio_encoder" in names)
        except (ValueError, KeyError, OSError) as error:  # a damaged or foreign file, under its component's name
            text = error.args[0] if isinstance(error, KeyError) and error.args else error
            raise InputError(name, " ".join(str(text).split())) from None
        ready.update({k: v for k, v in loaded.items() if not _is_object(components.get(k))})  # objects given win
    return pipeline_class(**{name: ready.get(name) for name in names})
