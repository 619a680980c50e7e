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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..loaders.pipeline_folder import read_model_index, saved_component_folders
from ..pipelines.buckets import RESOLUTIONS, scale_to_long_side
from .tasks import DEFAULT_PROMPT, DEFAULT_SEED, TASKS, Media, TaskSpec
from .tiny import TINY_LONG_SIDE


PARALLEL_BACKENDS = ("diffusers", "xfuser")
#: the library's argument names -> the request field (= the command-line flag without "--") that sets each; a name
#: missing here is a request field itself (`load_image(..., name="input_image")`)
ARGUMENT_FIELDS = {
    "ref_images": "ref_imgs",
    "video": "input_video",
    "image": "input_image",
    "audio": "input_audio",
    "audio_embeds": "input_audio",
    "num_inference_steps": "steps",
    "num_frames": "duration",
    "fps": "keep_source_fps",
}


class RequestError(InputError):
    """A bad request value, under the command-line flag that sets it: `argument` is the request field
    (`max_audio_seconds`), `flag` its flag (`--max-audio-seconds`); `str()` reads "--flag: message", what the CLI
    prints after "error: " and the web app shows under the field's input. `argument` None: no flag (`str()` is the
    message)."""

    def __init__(self, argument: str | None, message: str):
        super().__init__(argument, message)
        self.flag = None if argument is None else flag_of(argument)

    def __str__(self) -> str:
        return self.message if self.flag is None else f"{self.flag}: {self.message}"


class RunFailure(RequestError):
    """A run of valid inputs that failed (the model diverged, the GPU ran out of memory): no flag, `str()` is the one
    line to show; the CLI exits with 1 (2 is for refused inputs)."""

    def __init__(self, argument: str | None = None, message: str = ""):
        super().__init__(argument, message)


def flag_of(argument: str) -> str:
    """The flag that sets a library argument or request field: `num_inference_steps` -> `--steps`."""
    return "--" + ARGUMENT_FIELDS.get(argument, argument).replace("_", "-")


def one_line(error: BaseException) -> str:
    """An exception's message on one line (a `KeyError`'s without the quotes `str()` adds)."""
    text = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
    return " ".join(str(text).split()) or type(error).__name__


def load_error_types() -> tuple[type[BaseException], ...]:
    """What loaders raise for a file or folder they cannot use: their own `ValueError`s and `KeyError`s, a missing or
    unreadable file, a damaged archive, safetensors' own error."""
    import pickle
    import zipfile

    from safetensors import SafetensorError

    return (ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, SafetensorError)


@contextmanager
def loading(argument: str):
    """Errors of a loader reading what `argument` (a request field: `model`, `transformer`, `vae`, ...) names become
    a `RequestError` under its flag, on one line; a library `InputError` keeps its own argument."""
    try:
        yield
    except InputError as error:
        raise flagged(error) from None
    except load_error_types() as error:
        raise RequestError(argument, one_line(error)) from None


def reported(error: BaseException) -> RequestError | None:
    """The one line a front door shows for an error raised on purpose: a request error as it is, a library
    `InputError` (or a `ValueError` naming an argument) under its flag, the NaN guard's `FloatingPointError` and an
    out-of-memory error as a `RunFailure`; None for anything else (a bug: its traceback is worth showing)."""
    import torch

    if isinstance(error, RequestError):
        return error
    if isinstance(error, InputError):
        return flagged(error)
    if isinstance(error, FloatingPointError):  # FiniteWatch: the latents held NaN or inf; nothing was decoded
        return RunFailure(None, one_line(error))
    if isinstance(error, torch.OutOfMemoryError):
        first = str(error).split(". ")[0]
        return RunFailure(None, f"out of GPU memory ({first}); try --offload, --low-vram or a lower --resolution")
    if isinstance(error, ValueError):
        typed = as_input_error(error)
        return flagged(typed) if typed is not None else RequestError(None, one_line(error))
    return None


def flagged(error: InputError) -> RequestError:
    """A library argument error -> the same message under the flag that sets the argument (its mentions of other
    arguments, `` `max_audio_seconds` ``, become their flags too)."""
    if isinstance(error, RequestError):
        return error
    message = error.message
    for argument in MENTIONED_ARGUMENTS:
        message = message.replace(f"`{argument}`", flag_of(argument))
    return RequestError(ARGUMENT_FIELDS.get(error.argument, error.argument), message)


def as_input_error(error: ValueError) -> InputError | None:
    """A library `ValueError` as an `InputError`: typed errors as they are; an error raised as text by a library
    function not typed yet ("`name`: message" or "`name` must ...") read from its text; None when it names no
    argument."""
    if isinstance(error, InputError):
        return error
    text = str(error)
    argument, quote, rest = text[1:].partition("`")
    if not text.startswith("`") or not quote or not argument.isidentifier():
        return None
    if rest.startswith(": "):
        return InputError(argument, rest[2:])
    if rest[:1] == " " and rest[1:2].islower():
        return InputError(argument, rest[1:])
    return None


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one run needs; the field names follow the CLI flags. A field left None takes the task's default
    (`tasks.TaskDefaults`); `validate` returns a copy with those filled in, the decoded inputs in `media` and the
    output's frame rate in `fps`."""

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
    duration: int | None = None
    resolution: str | None = None
    height: int | None = None
    width: int | None = None
    seed: int = DEFAULT_SEED
    steps: int | None = None
    guidance_scale: float | None = None
    ref_imgs: list[str] = field(default_factory=list)
    input_video: str | None = None
    input_image: str | None = None
    input_audio: str | None = None
    window_prompt: str | None = None
    prompt_in_every_window: bool = False
    clip_from_reference: bool = False
    output_audio: str | None = None
    max_audio_seconds: float | None = None
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
    fps: float | None = None
    media: Media | None = field(default=None, repr=False, compare=False)

    @property
    def spec(self) -> TaskSpec:
        return TASKS[self.task]


REQUEST_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationRequest) if f.name not in ("fps", "media"))
#: every field's default (what a request that does not set it holds)
FIELD_DEFAULTS = {
    f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    for f in dataclasses.fields(GenerationRequest)
}
#: pipeline arguments a request sets (under another name, or its own), which messages name as flags
MENTIONED_ARGUMENTS = {*ARGUMENT_FIELDS}.union(
    *(set(REQUEST_FIELDS) & set(inspect.signature(spec.pipeline_class.__call__).parameters) for spec in TASKS.values())
)


def with_task_defaults(request: GenerationRequest) -> GenerationRequest:
    """The request with every field left None set to its task's default (`TaskDefaults`); `--reproduce-original`
    takes the original's where the defaults differ on purpose. The resolution stays None for `--model tiny` (a
    256-px size, `output_size`)."""
    defaults = request.spec.defaults
    resolution = request.resolution
    if resolution is None and request.model != "tiny":
        original = defaults.original_resolution if request.reproduce_original else None
        resolution = original or defaults.resolution
    filled = {
        "steps": defaults.steps,
        "duration": defaults.duration,
        "guidance_scale": defaults.guidance_scale,
        "max_audio_seconds": defaults.max_audio_seconds,
    }
    given = {name: value for name, value in filled.items() if getattr(request, name) is None}
    return dataclasses.replace(request, resolution=resolution, **given)


def _apply_fast_preset(request: GenerationRequest) -> GenerationRequest:
    """`--fast`: fill in `optimization.fast_preset()` (the first 8-bit attention that runs here, FP8 linears,
    compile); conflicting choices are an error naming the flag."""
    from ..optimization import fast_preset

    if request.low_vram:
        raise RequestError("fast", "--fast quantizes with fp8_dynamic; --low-vram quantizes weight-only: choose one")
    preset = fast_preset()
    for name, value in preset.items():
        current = getattr(request, name)
        if current not in (None, False, value):
            raise RequestError("fast", f"--fast sets --{name.replace('_', '-')} {value}; got {current!r} as well")
    return dataclasses.replace(request, **preset)


def validate(request: GenerationRequest) -> GenerationRequest:
    """Fill in the task's defaults, check the run options, decode the inputs once and run the task pipeline's own
    checks (no weights); returns the validated request. Raises `RequestError` naming the flag."""
    if request.task not in TASKS:
        raise RequestError("task", f"must be one of {sorted(TASKS)}, got {request.task!r}")
    check_task_fields(request)
    request = with_task_defaults(request)
    if request.fast:
        request = _apply_fast_preset(request)
    check_run_options(request)
    if request.resolution is not None and request.resolution not in RESOLUTIONS:
        raise RequestError("resolution", f"must be one of {list(RESOLUTIONS)}, got {request.resolution!r}")
    media = _load_media(request)
    validated = dataclasses.replace(request, media=media, fps=_output_fps(request, media))
    try:
        validated.spec.check_inputs(pipeline_kwargs(validated, output_size(validated)))
    except InputError as error:
        raise flagged(error) from None
    return validated


def check_run_options(request: GenerationRequest) -> None:
    """What only a run has: the model folder, memory, quantisation, parallel and output options."""
    from ..optimization import QUANTIZATION_MODES, check_quantization_available

    if sum([request.offload, request.low_vram, request.group_offload, request.sequential_offload]) > 1:
        raise RequestError("offload", "choose one of --offload, --group-offload, --sequential-offload, --low-vram")
    if request.quantize is not None and request.quantize not in QUANTIZATION_MODES:
        raise RequestError("quantize", f"must be one of {QUANTIZATION_MODES}, got {request.quantize!r}")
    check_device(request.device)
    if request.attention_backend is not None:
        from ..models.attention_backends import check_attention_backend_available

        try:
            check_attention_backend_available(request.attention_backend)
        except (ImportError, RuntimeError, ValueError) as error:
            raise RequestError("attention_backend", one_line(error)) from None
    _check_parallel_backend(request)
    _validate_shard_weights(request)
    if not isinstance(request.crf, int) or not 0 <= request.crf <= 51:
        raise RequestError("crf", f"must be an integer in [0, 51] (0 = lossless), got {request.crf!r}")
    if not isinstance(request.seed, int) or isinstance(request.seed, bool) or not 0 <= request.seed < 2**63:
        raise RequestError(
            "seed",
            f"must be an integer in [0, {2**63 - 1}] (the generator's range; e.g. --seed {DEFAULT_SEED}), got "
            f"{request.seed!r}",
        )
    _check_duration(request)
    _check_model(request)
    if request.transformer is not None:
        _check_transformer_file(request)
    if request.quantize is not None:
        try:
            check_quantization_available(request.quantize, run_device(request.device))
        except RuntimeError as error:
            raise RequestError("quantize", one_line(error)) from None


#: device types a run can use (torch's others are not GPUs for this package: meta, xla, ...)
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


def check_device(device: str | None) -> None:
    """`--device`: a torch device of a kind this machine has (`cuda` with a CUDA GPU, `cuda:N` with N below the GPU
    count), checked before any model loads. None: CUDA when available, else the CPU."""
    import torch

    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise RequestError("device", f"must be cpu, cuda or cuda:N (a GPU's index), got {device!r}")
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type)
    if not backend.is_available():
        built = " (this PyTorch is built without CUDA)" if parsed.type == "cuda" and torch.version.cuda is None else ""
        raise RequestError(
            "device", f"{device}: no {parsed.type.upper()} device is available here{built}; use --device cpu"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise RequestError(
            "device",
            f"{device}: this machine has {count} {parsed.type} device(s), {parsed.type}:0 to {parsed.type}:{count - 1}",
        )


def run_device(device: str | None) -> str:
    """The device a run uses: `--device`, else CUDA when available, else the CPU."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def task_fields(spec: TaskSpec) -> set[str]:
    """The request fields only some tasks read (every task's `inputs` and `options`), less those of `spec`'s: what a
    request for `spec` must leave unset."""
    specific = set().union(*(set(other.inputs) | set(other.options) for other in TASKS.values()))
    return specific - set(spec.inputs) - set(spec.options)


def check_task_fields(request: GenerationRequest) -> None:
    """A flag of another task (`--resume-dir` for reference-to-video, `--ref-imgs` for the avatar) is refused,
    naming the tasks that read it: a flag that would do nothing is never silently ignored."""
    for name in sorted(task_fields(request.spec)):
        value = getattr(request, name)
        if value != FIELD_DEFAULTS[name] and value not in (None, ()):
            readers = [task for task, spec in TASKS.items() if name in (*spec.inputs, *spec.options)]
            raise RequestError(name, f"does not apply to {request.task} (only to {', '.join(readers)}); drop it")


def _check_model(request: GenerationRequest) -> None:
    """`--model` and the component-file flags: a pipeline folder (with files replacing some of its components), a
    ComfyUI models folder, or the files alone."""
    takes = inspect.signature(request.spec.pipeline_class.__init__).parameters
    for name in COMPONENT_FILE_FLAGS:
        if getattr(request, name) is not None and name not in takes:
            raise RequestError(name, f"{request.task} has no {name.replace('_', ' ')}")
    if uses_component_files(request):
        _check_component_files(request)
        return
    if request.model != "tiny":
        _check_model_folder(Path(request.model), request.spec)
    if request.tokenizer is not None:
        raise RequestError("tokenizer", "is for pipelines built from component files (a pipeline folder has its own)")
    for name in COMPONENT_FILE_FLAGS[1:]:
        value = getattr(request, name)
        if value is not None and request.model == "tiny":
            raise RequestError(name, "needs --model: a pipeline folder, a ComfyUI models folder, or none (files only)")
        if value is not None and not Path(value).is_file():
            raise RequestError(name, f"{value!r}: no such file")


def _check_parallel_backend(request: GenerationRequest) -> None:
    if request.parallel_backend not in PARALLEL_BACKENDS:
        raise RequestError("parallel_backend", f"must be one of {PARALLEL_BACKENDS}, got {request.parallel_backend!r}")
    if request.parallel_backend == "xfuser":
        if request.ulysses_degree * request.ring_degree == 1:
            raise RequestError(
                "parallel_backend",
                "xfuser shards over several processes: run under torchrun with "
                "--ulysses-degree and/or --ring-degree > 1",
            )
        from ..parallel.xfuser import import_xfuser

        try:
            import_xfuser()
        except ImportError as error:
            raise RequestError("parallel_backend", str(error)) from None


def _check_duration(request: GenerationRequest) -> None:
    """Seconds, for the tasks that take a duration (the avatar's length is its audio's); where the pipeline counts
    frames (`TaskSpec.max_frames`), the limit in seconds, as the flag."""
    spec = request.spec
    if spec.defaults.duration is None:
        return
    duration = request.duration
    if not isinstance(duration, int) or isinstance(duration, bool) or duration < 1:
        raise RequestError("duration", f"must be a positive integer number of seconds, got {duration!r}")
    fps = spec.defaults.fps
    if spec.max_frames is not None and duration * fps + 1 > spec.max_frames:
        raise RequestError(
            "duration",
            f"must be at most {(spec.max_frames - 1) // fps} seconds for {request.task} (the model "
            f"generates up to {spec.max_frames} frames at {fps} fps), got {duration}",
        )


def _load_media(request: GenerationRequest) -> Media:
    """Decode the task's inputs once (the built-in examples for `--model tiny` without inputs)."""
    spec = request.spec
    if request.model == "tiny" and not any(getattr(request, name) for name in spec.inputs):
        print("[skyreels-v3] no input given: using built-in synthetic example inputs.")
        return spec.example_inputs()
    try:
        return spec.load_inputs(request)
    except ValueError as error:
        typed = as_input_error(error)
        if typed is None:
            raise
        raise flagged(typed) from None


def _output_fps(request: GenerationRequest, media: Media) -> float | int:
    """The written video's frame rate: the task's, or with `--keep-source-fps` the input video's."""
    if not request.keep_source_fps:
        return request.spec.defaults.fps
    source_fps = media.video_fps
    if not source_fps or round(source_fps) % 4:
        raise RequestError("keep_source_fps", f"needs a source frame rate that is a multiple of 4, got {source_fps}")
    return float(round(source_fps))


def _validate_shard_weights(request: GenerationRequest) -> None:
    if not request.shard_weights:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise RequestError(
            "shard_weights",
            "shards the transformer over processes: run under torchrun with 2 or more processes (--nproc_per_node)",
        )
    others = [
        name for name in ("offload", "low_vram", "group_offload", "sequential_offload") if getattr(request, name)
    ]
    if others or request.quantize is not None:
        used = [f"--{name.replace('_', '-')}" for name in others] + (["--quantize"] if request.quantize else [])
        raise RequestError(
            "shard_weights", f"cannot be combined with {', '.join(used)} (FSDP2 shards resident bf16 weights)"
        )
    transformer = Path(request.transformer) if request.transformer else None
    if transformer is not None and transformer.suffix == ".safetensors" and transformer.is_file():
        if _holds_fp8(transformer):
            raise RequestError(
                "shard_weights", f"cannot shard an FP8 transformer file ({transformer.name}): bf16 only"
            )


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
    if saved_component_folders(folder):  # a converted folder that lost its model_index.json (its vae/ too)
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
        raise RequestError("model", f"{request.task} needs component files: {lines}")


def _check_model_folder(folder: Path, spec: TaskSpec) -> None:
    if not folder.is_dir():
        raise RequestError(
            "model", f"{str(folder)!r} is neither 'tiny', a pipeline folder nor a ComfyUI models folder"
        )
    index = folder / "model_index.json"
    if not index.is_file() and not saved_component_folders(folder):
        raise RequestError(
            "model",
            f"{folder} has no model_index.json (convert the original weights first) and no ComfyUI "
            "models subfolders (diffusion_models/, text_encoders/, vae/, ...)",
        )
    try:
        entries = read_model_index(folder)  # a missing or damaged model_index.json: one line naming it
    except ValueError as error:
        raise RequestError("model", str(error)) from None
    if entries.get("_class_name") != spec.pipeline_class.__name__:
        raise RequestError(
            "model",
            f"{folder} holds a {entries.get('_class_name')!r} pipeline, not the "
            f"{spec.pipeline_class.__name__} of --task {spec.name}",
        )
    for name in inspect.signature(spec.pipeline_class.__init__).parameters:
        if name != "self" and (name not in entries or not (folder / name).is_dir()):
            raise RequestError("model", f"{folder} is missing the {name!r} component")


TRANSFORMER_FILE_TYPES = (".gguf", ".safetensors", ".pth", ".pt")


def _check_transformer_file(request: GenerationRequest) -> None:
    from ..loaders.comfyui import find_component_file

    if request.model == "tiny":
        raise RequestError(
            "transformer", "needs --model FOLDER (a converted pipeline folder for the other components)"
        )
    models_dir = Path(request.model) if uses_component_files(request) and request.model else None
    path = find_component_file(models_dir, "transformer", request.transformer)[0] or Path(request.transformer)
    if path.suffix not in TRANSFORMER_FILE_TYPES or not path.is_file():
        raise RequestError("transformer", f"{request.transformer!r} is not a {'/'.join(TRANSFORMER_FILE_TYPES)} file")
    if path.suffix in (".safetensors", ".pth", ".pt"):
        _check_transformer_header(path, request.spec.variant)
    if request.quantize is not None and path.suffix == ".safetensors" and _holds_fp8(path):
        raise RequestError("quantize", f"{path.name} is already FP8 (scaled-FP8 file); drop --quantize / --fast")
    if path.suffix == ".gguf":
        if request.quantize is not None:
            raise RequestError("quantize", "cannot quantise a GGUF transformer again; drop --quantize")
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise RequestError(
                "transformer", "GGUF files need the gguf package: pip install 'skyreels-diffusers[gguf]'"
            ) from None


def _check_transformer_header(path: Path, variant: str) -> None:
    """A damaged header or a transformer of the other architecture, from the file's index alone (no weights)."""
    from ..loaders.single_file import COMFY_PREFIXES, check_architecture
    from ..loaders.tensor_io import file_index

    with loading("transformer"):
        keys = list(file_index(path))
        for prefix in COMFY_PREFIXES:
            keys = [key.removeprefix(prefix) for key in keys]
        check_architecture(dict.fromkeys(keys), variant, str(path))


def _holds_fp8(path: Path) -> bool:
    """Whether a safetensors file holds FP8 tensors (header only)."""
    from ..loaders.scaled_fp8 import FP8_DTYPES
    from ..loaders.tensor_io import safetensors_index

    try:
        return any(info.dtype in FP8_DTYPES for info in safetensors_index(path).values())
    except (ValueError, KeyError):
        return False  # the loader reports the damaged file


def output_size(request: GenerationRequest) -> tuple[int | None, int | None]:
    """(height, width): explicit, else the task's bucket for the input; `--model tiny` without `--resolution`
    shrinks the 480P bucket to a long side of 256 px so that a CPU run takes seconds. (None, None) while the input's
    size is unknown."""
    if request.height is not None or request.width is not None:
        return request.height, request.width
    size = request.media.size() if request.media is not None else None
    if size is None:
        return None, None
    tiny_default = request.model == "tiny" and request.resolution is None
    bucket = request.spec.bucket(*size, "480P" if tiny_default else request.resolution)
    return scale_to_long_side(*bucket, TINY_LONG_SIDE) if tiny_default else bucket


def pipeline_kwargs(request: GenerationRequest, size: tuple[int | None, int | None], **extra) -> dict:
    """The task pipeline's keyword arguments for a validated request."""
    height, width = size
    kwargs = dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        height=height,
        width=width,
        resolution=request.resolution or request.spec.defaults.resolution,
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
        raise RequestError("ulysses_degree", str(error)) from None
    if request.parallel_backend == "diffusers":  # xfuser's USP attention does its ring itself
        try:
            check_ring_backend(request.ring_degree, request.attention_backend)
        except ValueError as error:
            raise RequestError("ring_degree", str(error)) from None


def request_fields() -> list[str]:
    return list(REQUEST_FIELDS)
