"""One generation request: parsed, its inputs decoded once, checked by the pipelines' own checks before any model
loads, then run. The code path shared by the `skyreels-v3` command line and the web app.

The request layer owns what only a run has (model folder, memory and parallel options, the output file); every
limit on a pipeline argument lives in the pipeline (`check_inputs`), and its errors are reported here under the
command-line flag that sets the argument.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..loaders.pipeline_folder import read_model_index
from ..pipelines.buckets import RESOLUTIONS, avatar_bucket_size, bucket_size, scale_to_long_side
from ..pipelines.pipeline_skyreels_v3_extension import NUM_CONDITION_FRAMES
from ..pipelines.pipeline_skyreels_v3_reference import MAX_NUM_FRAMES as REFERENCE_MAX_FRAMES
from ..pipelines.pipeline_skyreels_v3_shot_switching import SHOT_NUM_CONDITION_FRAMES_MAP
from ..pipelines.video_io import load_image, load_video_tail
from .tasks import TASKS, TaskSpec
from .tiny import TINY_LONG_SIDE


DEFAULT_PROMPT = "A man is making his way forward slowly, leaning on a white cane to prop himself up."
MODEL_FPS = 24
PARALLEL_BACKENDS = ("diffusers", "xfuser")
#: pipeline argument -> the command-line flag (without "--") that sets it
ARGUMENT_FLAGS = {
    "ref_images": "ref-imgs",
    "video": "input-video",
    "image": "input-image",
    "audio": "input-audio",
    "audio_embeds": "input-audio",
    "num_inference_steps": "steps",
    "num_frames": "duration",
    "guidance_scale": "guidance-scale",
    "negative_prompt": "negative-prompt",
    "resize_mode": "resize-mode",
    "fps": "keep-source-fps",
    "max_audio_seconds": "max-audio-seconds",
    "output_audio": "output-audio",
    "resume_dir": "resume-dir",
    "window_prompt": "window-prompt",
}


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one run needs; the field names follow the CLI flags. `validate` returns a copy with the decoded
    inputs in `media` and the frame rate in `fps`."""

    task: str
    model: str = "tiny"
    transformer: str | None = None  # single-file / GGUF / FP8-scaled transformer replacing the folder's
    # component files (ComfyUI's / kijai's / the original's) replacing the folder's, or the whole pipeline from files
    text_encoder: str | None = None
    vae: str | None = None
    image_encoder: str | None = None
    audio_encoder: str | None = None
    tokenizer: str | None = None  # for pipelines built from files: a tokenizer folder or Hub id
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str | None = None
    duration: int = 5
    resolution: str | None = None
    height: int | None = None
    width: int | None = None
    seed: int = 42
    steps: int = 8
    guidance_scale: float = 1.0
    ref_imgs: list[str] = field(default_factory=list)
    input_video: str | None = None
    input_image: str | None = None
    input_audio: str | None = None
    window_prompt: str | None = None
    prompt_in_every_window: bool = False
    clip_from_reference: bool = False
    output_audio: str | None = None
    max_audio_seconds: float = 200.0
    resume_dir: str | None = None
    keep_source_fps: bool = False
    resize_mode: str | None = None
    return_input_video: bool = False
    reproduce_original: bool = False
    output: str | None = None
    overwrite: bool = False  # replace an existing --output file
    crf: int = 10
    offload: bool = False
    low_vram: bool = False
    group_offload: bool = False
    sequential_offload: bool = False
    quantize: str | None = None
    compile: bool = False
    attention_backend: str | None = None
    fast: bool = False
    ulysses_degree: int = 1
    ring_degree: int = 1
    parallel_backend: str = "diffusers"
    shard_weights: bool = False
    device: str | None = None

    # set by `validate`
    fps: float = MODEL_FPS
    media: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]


def _error(argument: str, message: str) -> ValueError:
    """`--flag: message`, where the message's own mentions of pipeline arguments (`` `max_audio_seconds` ``) become
    the flags that set them (`--max-audio-seconds`)."""
    message = re.sub(
        r"`(\w+)`",
        lambda m: f"--{ARGUMENT_FLAGS[m.group(1)]}" if m.group(1) in ARGUMENT_FLAGS else m.group(0),
        message,
    )
    return ValueError(f"--{argument.replace('_', '-')}: {message}")


def flag_error(error: ValueError) -> ValueError:
    """A pipeline's argument error -> the same message under the flag that sets the argument."""
    message = str(error)
    argument = getattr(error, "argument", None)
    match = re.match(r"`(\w+)(\[\d+\])?`(:)? ?", message)
    if argument is None and match:
        argument = match.group(1)
    if argument is None:
        return error
    # "`name` must be ..." / "`name`: ..." -> "--flag: must be ..." / "--flag: ..."
    if match and (message[match.end() : match.end() + 1].islower() or (match.group(3) and not match.group(2))):
        message = message[match.end() :]
    return _error(ARGUMENT_FLAGS.get(argument, argument), message)


def _apply_fast_preset(request: GenerationRequest) -> GenerationRequest:
    """`--fast`: fill in `optimization.fast_preset()` (the first 8-bit attention that runs here, FP8 linears,
    compile); conflicting choices are an error naming the flag."""
    from ..optimization import fast_preset

    if request.low_vram:
        raise _error("fast", "--fast quantizes with fp8_dynamic; --low-vram quantizes weight-only: choose one")
    preset = fast_preset()
    for name, value in preset.items():
        current = getattr(request, name)
        if current not in (None, False, value):
            raise _error("fast", f"--fast sets --{name.replace('_', '-')} {value}; got {current!r} as well")
    return dataclasses.replace(request, **preset)


def validate(request: GenerationRequest) -> GenerationRequest:
    """Check the run options, decode the inputs once and run the task pipeline's own checks (no weights); returns
    the validated request. Raises `ValueError` naming the flag."""
    if request.task not in TASKS:
        raise _error("task", f"must be one of {sorted(TASKS)}, got {request.task!r}")
    if request.fast:
        request = _apply_fast_preset(request)
    _check_run_options(request)
    media, fps = _load_media(request)
    resolution = request.resolution
    if resolution is not None and resolution not in RESOLUTIONS:
        raise _error("resolution", f"must be one of {list(RESOLUTIONS)}, got {resolution!r}")
    if request.task == "talking_avatar" and resolution is None and request.model != "tiny":
        resolution = "480P"
    validated = dataclasses.replace(request, media=media, fps=fps, resolution=resolution)
    try:
        validated.spec.check_inputs(pipeline_kwargs(validated, output_size(validated)))
    except ValueError as error:
        raise flag_error(error) from None
    return validated


def _check_run_options(request: GenerationRequest) -> None:
    """What only a run has: the model folder, memory, quantisation, parallel and output options."""
    from ..optimization import QUANTIZATION_MODES

    if sum([request.offload, request.low_vram, request.group_offload, request.sequential_offload]) > 1:
        raise _error("offload", "choose one of --offload, --group-offload, --sequential-offload, --low-vram")
    if request.quantize is not None and request.quantize not in QUANTIZATION_MODES:
        raise _error("quantize", f"must be one of {QUANTIZATION_MODES}, got {request.quantize!r}")
    if request.attention_backend is not None:
        from ..models.attention_backends import check_attention_backend_available

        try:
            check_attention_backend_available(request.attention_backend)
        except (ImportError, RuntimeError) as error:
            raise _error("attention_backend", str(error)) from None
    if request.parallel_backend not in PARALLEL_BACKENDS:
        raise _error("parallel_backend", f"must be one of {PARALLEL_BACKENDS}, got {request.parallel_backend!r}")
    if request.parallel_backend == "xfuser":
        if request.ulysses_degree * request.ring_degree == 1:
            raise _error(
                "parallel_backend",
                "xfuser shards over several processes: run under torchrun with "
                "--ulysses-degree and/or --ring-degree > 1",
            )
        from ..parallel.xfuser import import_xfuser

        try:
            import_xfuser()
        except ImportError as error:
            raise _error("parallel_backend", str(error)) from None
    _validate_shard_weights(request)
    if not isinstance(request.crf, int) or not 0 <= request.crf <= 51:
        raise _error("crf", f"must be an integer in [0, 51] (0 = lossless), got {request.crf!r}")
    if not isinstance(request.seed, int) or not 0 <= request.seed < 2**63:
        raise _error("seed", f"must be an integer in [0, 2^63), got {request.seed!r}")
    positive = request.spec.default_duration > 0  # the avatar's length is its audio's
    if (
        not isinstance(request.duration, int)
        or isinstance(request.duration, bool)
        or (positive and request.duration < 1)
    ):
        raise _error("duration", f"must be a positive integer number of seconds, got {request.duration!r}")
    if request.spec.variant == "reference" and request.duration * MODEL_FPS + 1 > REFERENCE_MAX_FRAMES:
        # in seconds, as the flag (the pipeline's own check counts `num_frames`)
        raise _error(
            "duration",
            f"must be at most {(REFERENCE_MAX_FRAMES - 1) // MODEL_FPS} seconds for {request.task} (the model "
            f"generates up to {REFERENCE_MAX_FRAMES} frames at {MODEL_FPS} fps), got {request.duration}",
        )
    takes = inspect.signature(request.spec.pipeline_class.__init__).parameters
    for name in COMPONENT_FILE_FLAGS:
        if getattr(request, name) is not None and name not in takes:
            raise _error(name, f"{request.task} has no {name.replace('_', ' ')}")
    if uses_component_files(request):
        _check_component_files(request)
    else:
        if request.model != "tiny":
            _check_model_folder(Path(request.model), request.spec)
        if request.tokenizer is not None:
            raise _error("tokenizer", "is for pipelines built from component files (a pipeline folder has its own)")
        for name in COMPONENT_FILE_FLAGS[1:]:
            value = getattr(request, name)
            if value is not None and request.model == "tiny":
                raise _error(name, "needs --model: a pipeline folder, a ComfyUI models folder, or none (files only)")
            if value is not None and not Path(value).is_file():
                raise _error(name, f"{value!r}: no such file")
    if request.transformer is not None:
        _check_transformer_file(request)


def _load_media(request: GenerationRequest) -> tuple[dict, float]:
    """Decode the task's inputs once (the built-in examples for `--model tiny` without inputs); returns them and the
    frame rate of the output."""
    spec = request.spec
    given = request.ref_imgs or request.input_video or request.input_image or request.input_audio
    if request.model == "tiny" and not given:
        print("[skyreels-v3] no input given: using built-in synthetic example inputs.")
        return spec.example_media(), spec.fps
    try:
        if spec.variant == "reference":
            refs = [p.strip() for item in request.ref_imgs for p in str(item).split(",") if p.strip()]
            spec.pipeline_class.check_reference_count(refs)  # before any of them is opened
            return {"images": [load_image(path, name="ref_imgs") for path in refs]}, spec.fps
        if spec.variant == "extension":
            return _load_video(request)
        from ..pipelines.audio_io import load_speech

        if request.input_image is None:
            raise _error("input_image", "is required for talking_avatar")
        if request.input_audio is None:
            raise _error("input_audio", "is required for talking_avatar")
        image = load_image(request.input_image, name="input_image")
        speech = load_speech(request.input_audio, max_seconds=request.max_audio_seconds, name="input_audio")
        return {"image": image, "speech": speech}, spec.fps
    except ValueError as error:
        if str(error).startswith("--"):
            raise
        if getattr(error, "argument", None):  # a pipeline check
            raise flag_error(error) from None
        argument, _, message = str(error).partition(": ")
        raise _error(argument.strip("`"), message) from None


def _validate_shard_weights(request: GenerationRequest) -> None:

    if not request.shard_weights:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise _error(
            "shard_weights",
            "shards the transformer over processes: run under torchrun with 2 or more processes (--nproc_per_node)",
        )
    others = [
        name for name in ("offload", "low_vram", "group_offload", "sequential_offload") if getattr(request, name)
    ]
    if others or request.quantize is not None:
        used = [f"--{name.replace('_', '-')}" for name in others] + (["--quantize"] if request.quantize else [])
        raise _error(
            "shard_weights", f"cannot be combined with {', '.join(used)} (FSDP2 shards resident bf16 weights)"
        )
    transformer = Path(request.transformer) if request.transformer else None
    if transformer is not None and transformer.suffix == ".safetensors" and transformer.is_file():
        if _holds_fp8(transformer):
            raise _error("shard_weights", f"cannot shard an FP8 transformer file ({transformer.name}): bf16 only")


def _load_video(request: GenerationRequest) -> tuple[dict, float]:
    if request.input_video is None:
        raise _error("input_video", "is required for the extension tasks")
    # only the tail is used (the condition frames; the whole video with --return-input-video)
    tail = max(NUM_CONDITION_FRAMES, *SHOT_NUM_CONDITION_FRAMES_MAP.values())
    frames, source_fps = load_video_tail(
        request.input_video, None if request.return_input_video else tail, name="input_video"
    )
    fps = float(request.spec.fps)
    if request.keep_source_fps:
        if not source_fps or round(source_fps) % 4:
            raise _error("keep_source_fps", f"needs a source frame rate that is a multiple of 4, got {source_fps}")
        fps = float(round(source_fps))
    return {"frames": frames}, fps


#: flags naming one component's file (the pipeline's component names)
COMPONENT_FILE_FLAGS = ("transformer", "text_encoder", "vae", "image_encoder", "audio_encoder")


def uses_component_files(request: GenerationRequest) -> bool:
    """The pipeline is built from single component files: `--model` is a ComfyUI `models` folder, or empty."""
    from ..loaders.comfyui import COMFYUI_FOLDERS

    if request.model == "":
        return True
    folder = Path(request.model)
    if request.model == "tiny" or not folder.is_dir() or (folder / "model_index.json").is_file():
        return False
    return any((folder / sub).is_dir() for subs in COMFYUI_FOLDERS.values() for sub in subs)


def _check_component_files(request: GenerationRequest) -> None:
    """Every weight file the task's pipeline needs, found (header only) or named; all missing ones listed at once."""
    from ..loaders.comfyui import find_component_files

    components = {name: getattr(request, name) for name in COMPONENT_FILE_FLAGS}
    models_dir = Path(request.model) if request.model else None
    _, missing = find_component_files(request.spec.pipeline_class, models_dir, components)
    if missing:
        lines = "; ".join(f"--{name.replace('_', '-')} FILE ({reason})" for name, reason in missing.items())
        raise _error("model", f"{request.task} needs component files: {lines}")


def _check_model_folder(folder: Path, spec: TaskSpec) -> None:
    if not folder.is_dir():
        raise _error("model", f"{str(folder)!r} is neither 'tiny', a pipeline folder nor a ComfyUI models folder")
    index = folder / "model_index.json"
    if not index.is_file():
        raise _error(
            "model",
            f"{folder} has no model_index.json (convert the original weights first) and no ComfyUI "
            "models subfolders (diffusion_models/, text_encoders/, vae/, ...)",
        )
    try:
        entries = read_model_index(folder)  # a damaged model_index.json: one line naming it
    except ValueError as error:
        raise _error("model", str(error)) from None
    if entries.get("_class_name") != spec.pipeline_class.__name__:
        raise _error(
            "model",
            f"{folder} holds a {entries.get('_class_name')!r} pipeline, not the "
            f"{spec.pipeline_class.__name__} of --task {spec.name}",
        )
    for name in inspect.signature(spec.pipeline_class.__init__).parameters:
        if name != "self" and (name not in entries or not (folder / name).is_dir()):
            raise _error("model", f"{folder} is missing the {name!r} component")


TRANSFORMER_FILE_TYPES = (".gguf", ".safetensors", ".pth", ".pt")


def _check_transformer_file(request: GenerationRequest) -> None:
    from ..loaders.comfyui import find_component_file

    if request.model == "tiny":
        raise _error("transformer", "needs --model FOLDER (a converted pipeline folder for the other components)")
    models_dir = Path(request.model) if uses_component_files(request) and request.model else None
    path = find_component_file(models_dir, "transformer", request.transformer)[0] or Path(request.transformer)
    if path.suffix not in TRANSFORMER_FILE_TYPES or not path.is_file():
        raise _error("transformer", f"{request.transformer!r} is not a {'/'.join(TRANSFORMER_FILE_TYPES)} file")
    if request.quantize is not None and path.suffix == ".safetensors" and _holds_fp8(path):
        raise _error("quantize", f"{path.name} is already FP8 (scaled-FP8 file); drop --quantize / --fast")
    if path.suffix == ".gguf":
        if request.quantize is not None:
            raise _error("quantize", "cannot quantise a GGUF transformer again; drop --quantize")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise _error("transformer", "GGUF files need the gguf package: pip install 'skyreels-diffusers[gguf]'")


def _holds_fp8(path: Path) -> bool:
    """Whether a safetensors file holds FP8 tensors (header only)."""
    from ..loaders.scaled_fp8 import FP8_DTYPES
    from ..loaders.tensor_io import safetensors_index

    try:
        return any(info.dtype in FP8_DTYPES for info in safetensors_index(path).values())
    except (ValueError, KeyError):
        return False  # the loader reports the damaged file


def output_size(request: GenerationRequest) -> tuple[int | None, int | None]:
    """(height, width): explicit, else the bucket; `--model tiny` without `--resolution` shrinks the 480P bucket to
    a long side of 256 px so that a CPU run takes seconds. (None, None) while the input's size is unknown."""
    if request.height is not None or request.width is not None:
        return request.height, request.width
    media = request.media
    source = (media.get("images") or [None])[0] or media.get("image")
    if source is not None:
        height, width = source.height, source.width
    elif media.get("frames") is not None:
        height, width = media["frames"].shape[1:3]
    else:
        return None, None
    resolution = request.resolution or ("480P" if request.model == "tiny" else "720P")
    if request.task == "talking_avatar":
        bucket = avatar_bucket_size(height, width, request.resolution or "480P")
    elif resolution not in RESOLUTIONS:
        return None, None  # the pipeline's check names the bad resolution
    else:
        bucket = bucket_size(height, width, resolution)
    if request.model == "tiny" and request.resolution is None:
        return scale_to_long_side(*bucket, TINY_LONG_SIDE)
    return bucket


def pipeline_kwargs(request: GenerationRequest, size: tuple[int | None, int | None], **extra) -> dict:
    """The task pipeline's keyword arguments for a validated request."""
    height, width = size
    kwargs = dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        height=height,
        width=width,
        resolution=request.resolution or "720P",
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        output_type="np",
        reproduce_original=request.reproduce_original,
    )
    kwargs.update(request.spec.call_kwargs(request))
    kwargs.update(extra)
    return kwargs


def num_attention_heads(request: GenerationRequest) -> int:
    """The transformer's head count (what sequence-parallel degrees must divide)."""
    if request.model == "tiny":
        from ..models.configs import TINY_TRANSFORMER_CONFIGS

        return TINY_TRANSFORMER_CONFIGS[request.spec.variant]["num_attention_heads"]
    if uses_component_files(request):
        return _file_heads(request)
    config = json.loads((Path(request.model) / "transformer" / "config.json").read_text())
    return config.get("num_attention_heads", 40)


def _file_heads(request: GenerationRequest) -> int:
    """Heads of a transformer file: its width over the head width of every Wan2.1 size (header only)."""
    from ..loaders.comfyui import find_component_file
    from ..loaders.single_file import COMFY_PREFIXES, WAN_HEAD_DIM
    from ..loaders.tensor_io import file_index

    path = find_component_file(Path(request.model) if request.model else None, "transformer", request.transformer)[0]
    if path is None or path.suffix == ".gguf":
        return 40  # the real sizes; the loader reports a missing file
    shapes = {k.removeprefix(COMFY_PREFIXES[0]): v.shape for k, v in file_index(path).items()}
    return shapes["patch_embedding.weight"][0] // WAN_HEAD_DIM if "patch_embedding.weight" in shapes else 40


def check_parallel(request: GenerationRequest, world_size: int) -> None:
    """The sequence-parallel degrees against the model's heads and the number of processes."""
    from ..parallel.context_parallel import check_degrees, check_ring_backend

    try:
        check_degrees(num_attention_heads(request), request.ulysses_degree, request.ring_degree, world_size)
    except ValueError as error:
        raise _error("ulysses_degree", str(error)) from None
    if request.parallel_backend == "diffusers":  # xfuser's USP attention does its ring itself
        try:
            check_ring_backend(request.ring_degree, request.attention_backend)
        except ValueError as error:
            raise _error("ring_degree", str(error)) from None


def request_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(GenerationRequest) if f.name not in ("fps", "media")]
