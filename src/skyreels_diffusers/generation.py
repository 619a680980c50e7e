"""One generation request, validated before any model loads, then run: the code path shared by the
`skyreels-v3` command line (and anything else that drives the pipelines from plain arguments)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .pipelines.buckets import RESOLUTIONS, bucket_size, check_size, scale_to_long_side
from .pipelines.pipeline_skyreels_v3_reference import MAX_REFERENCES
from .pipelines.pipeline_skyreels_v3_shot_switching import SHOT_NUM_CONDITION_FRAMES_MAP
from .pipelines.pipeline_skyreels_v3_extension import NUM_CONDITION_FRAMES
from .pipelines.pipeline_skyreels_v3_talking_avatar import DEFAULT_WINDOW_PROMPT
from .pipelines.tiny import TASKS, TINY_LONG_SIDE, tiny_pipeline
from .pipelines.video_io import load_image, load_video_tail, write_video

DEFAULT_PROMPT = "A man is making his way forward slowly, leaning on a white cane to prop himself up."
MODEL_FPS = 24
PARALLEL_BACKENDS = ("diffusers", "xfuser")


@dataclass
class GenerationRequest:
    """Everything one run needs; the field names follow the CLI flags."""

    task: str
    model: str = "tiny"
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
    crf: int = 10
    offload: bool = False
    low_vram: bool = False
    group_offload: bool = False
    sequential_offload: bool = False
    quantize: str | None = None
    compile: bool = False
    attention_backend: str | None = None
    ulysses_degree: int = 1
    ring_degree: int = 1
    parallel_backend: str = "diffusers"
    device: str | None = None

    # resolved by `validate`
    fps: float = MODEL_FPS
    _media: dict = field(default_factory=dict, repr=False)


def _error(argument: str, message: str) -> ValueError:
    return ValueError(f"--{argument.replace('_', '-')}: {message}")


def validate(request: GenerationRequest) -> GenerationRequest:
    """Check every argument against its accepted range and read the inputs; raises `ValueError` naming the argument.
    Nothing is loaded but the input media."""
    if request.task not in TASKS:
        raise _error("task", f"must be one of {sorted(TASKS)}, got {request.task!r}")
    if not request.prompt or not request.prompt.strip():
        raise _error("prompt", "must not be empty")
    if request.resolution is not None and request.resolution not in RESOLUTIONS:
        raise _error("resolution", f"must be one of {list(RESOLUTIONS)}, got {request.resolution!r}")
    try:
        check_size(request.height, request.width)
    except ValueError as error:
        raise _error("height", str(error)) from None
    from .optimization import QUANTIZATION_MODES

    if sum([request.offload, request.low_vram, request.group_offload, request.sequential_offload]) > 1:
        raise _error("offload", "choose one of --offload, --group-offload, --sequential-offload, --low-vram")
    if request.quantize is not None and request.quantize not in QUANTIZATION_MODES:
        raise _error("quantize", f"must be one of {QUANTIZATION_MODES}, got {request.quantize!r}")
    if request.parallel_backend not in PARALLEL_BACKENDS:
        raise _error("parallel_backend", f"must be one of {PARALLEL_BACKENDS}, got {request.parallel_backend!r}")
    if request.parallel_backend == "xfuser":
        if request.ulysses_degree * request.ring_degree == 1:
            raise _error("parallel_backend", "xfuser shards over several processes: run under torchrun with "
                                             "--ulysses-degree and/or --ring-degree > 1")
        from .parallel.xfuser import import_xfuser

        try:
            import_xfuser()
        except ImportError as error:
            raise _error("parallel_backend", str(error)) from None
    if not isinstance(request.steps, int) or not 1 <= request.steps <= 100:
        raise _error("steps", f"must be an integer in [1, 100], got {request.steps!r}")
    if not request.guidance_scale >= 1.0:
        raise _error("guidance_scale", f"must be >= 1 (1 = off), got {request.guidance_scale!r}")
    if not isinstance(request.crf, int) or not 0 <= request.crf <= 51:
        raise _error("crf", f"must be an integer in [0, 51] (0 = lossless), got {request.crf!r}")
    if not isinstance(request.seed, int) or not 0 <= request.seed < 2**63:
        raise _error("seed", f"must be an integer in [0, 2^63), got {request.seed!r}")
    if request.model != "tiny" and not Path(request.model).is_dir():
        raise _error("model", f"{request.model!r} is neither 'tiny' nor a local pipeline folder")
    if request.model != "tiny":
        _check_model_folder(Path(request.model))

    no_inputs = not request.ref_imgs and request.input_video is None and request.input_image is None
    if request.model == "tiny" and no_inputs and request.input_audio is None:
        request._media = example_media(request.task)
        print("[skyreels-v3] no input given: using built-in synthetic example inputs.")

    if request.task == "talking_avatar":
        return _validate_avatar(request)

    if request.task == "reference_to_video":
        if not isinstance(request.duration, int) or not 1 <= request.duration <= 30:
            raise _error("duration", f"must be an integer number of seconds in [1, 30], got {request.duration!r}")
        if "images" in request._media:
            return request
        refs = [p for item in request.ref_imgs for p in str(item).split(",") if p.strip()]
        if not 1 <= len(refs) <= MAX_REFERENCES:
            raise _error("ref_imgs", f"takes 1 to {MAX_REFERENCES} images, got {len(refs)}")
        images = []
        for path in refs:
            try:
                images.append(load_image(path.strip(), name="ref_imgs"))
            except ValueError as error:
                raise _error("ref_imgs", str(error).split(": ", 1)[-1]) from None
        request.ref_imgs = [p.strip() for p in refs]
        request._media = {"images": images, "size": (images[0].height, images[0].width)}
    else:
        if request.input_video is None and "frames" not in request._media:
            raise _error("input_video", "is required for the extension tasks")
        if request.task == "shot_switching_extension":
            if request.duration not in SHOT_NUM_CONDITION_FRAMES_MAP:
                raise _error("duration", f"must be one of {sorted(SHOT_NUM_CONDITION_FRAMES_MAP)} for shot switching, "
                                         f"got {request.duration!r}")
            needed = SHOT_NUM_CONDITION_FRAMES_MAP[request.duration]
        else:
            if not isinstance(request.duration, int) or request.duration < 1:
                raise _error("duration", f"must be a positive integer number of seconds, got {request.duration!r}")
            needed = NUM_CONDITION_FRAMES
        try:
            frames, source_fps = request._media.get("frames"), MODEL_FPS
            if frames is None:
                frames, source_fps = load_video_tail(request.input_video, None if request.return_input_video
                                                     else needed, name="input_video")
        except ValueError as error:
            raise _error("input_video", str(error).split(": ", 1)[-1]) from None
        if len(frames) < needed:
            raise _error("input_video", f"has {len(frames)} frames; at least {needed} are needed")
        if request.keep_source_fps:
            if not source_fps or round(source_fps) % 4:
                raise _error("keep_source_fps", f"needs a source frame rate that is a multiple of 4, got {source_fps}")
            request.fps = float(round(source_fps))
        request._media = {"frames": frames, "size": frames.shape[1:3]}
    return request


def _validate_avatar(request: GenerationRequest) -> GenerationRequest:
    from .pipelines.audio_io import load_speech

    if request.output_audio not in (None, "original", "normalized"):
        raise _error("output_audio", f"must be 'original' or 'normalized', got {request.output_audio!r}")
    if not request.max_audio_seconds > 0:
        raise _error("max_audio_seconds", f"must be positive, got {request.max_audio_seconds!r}")
    if request.resolution is None and request.model != "tiny":
        request.resolution = "480P"
    if "image" not in request._media:
        if request.input_image is None:
            raise _error("input_image", "is required for talking_avatar")
        try:
            image = load_image(request.input_image, name="input_image")
        except ValueError as error:
            raise _error("input_image", str(error).split(": ", 1)[-1]) from None
        request._media.update(image=image, size=(image.height, image.width))
    if "speech" not in request._media:
        if request.input_audio is None:
            raise _error("input_audio", "is required for talking_avatar")
        try:
            request._media["speech"] = load_speech(request.input_audio, max_seconds=request.max_audio_seconds,
                                                   name="input_audio")
        except ValueError as error:
            raise _error("input_audio", str(error).split(": ", 1)[-1]) from None
    request.fps = 25
    return request


def _speech_like(seconds: float, rate: int = 16000) -> np.ndarray:
    """A voiced, syllable-modulated tone: enough for the tiny pipeline's audio path (not speech)."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voice = np.sin(2 * np.pi * np.cumsum(pitch) / rate) + 0.4 * np.sin(4 * np.pi * np.cumsum(pitch) / rate)
    return (0.2 * voice * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def example_media(task: str) -> dict:
    """Synthetic inputs for `--model tiny` runs without inputs: two reference images (portrait and landscape), or a
    2-second 24 fps clip of a moving disc."""
    import PIL.Image

    if task == "talking_avatar":
        from .pipelines.audio_io import load_speech

        y, x = np.mgrid[0:480, 0:360]
        face = np.full((480, 360, 3), 240, np.uint8)
        face[((y - 220) / 150) ** 2 + ((x - 180) / 110) ** 2 < 1] = (225, 180, 150)
        face[((y - 300) / 18) ** 2 + ((x - 180) / 45) ** 2 < 1] = (150, 60, 60)
        image = PIL.Image.fromarray(face)
        return {"image": image, "size": (image.height, image.width),
                "speech": load_speech(_speech_like(3.5), sample_rate=16000, name="input_audio")}
    if task == "reference_to_video":
        images = []
        for height, width, colour in ((480, 360, (220, 120, 140)), (360, 480, (150, 110, 60))):
            y, x = np.mgrid[0:height, 0:width]
            disc = ((y - height / 2) ** 2 + (x - width / 2) ** 2) < (min(height, width) / 3) ** 2
            array = np.full((height, width, 3), 245, np.uint8)
            array[disc] = colour
            images.append(PIL.Image.fromarray(array))
        return {"images": images, "size": (images[0].height, images[0].width)}
    frames = np.full((48, 144, 256, 3), 235, np.uint8)
    y, x = np.mgrid[0:144, 0:256]
    for i, frame in enumerate(frames):
        frame[((y - 72) ** 2 + (x - 40 - 3.5 * i) ** 2) < 30**2] = (60, 110, 200)
    return {"frames": frames, "size": frames.shape[1:3]}


_REQUIRED_COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
_AVATAR_COMPONENTS = ("image_encoder", "audio_encoder", "feature_extractor")


def _check_model_folder(folder: Path) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        raise _error("model", f"{folder} has no model_index.json (convert the original weights first)")
    entries = json.loads(index.read_text())
    required = _REQUIRED_COMPONENTS + (_AVATAR_COMPONENTS if entries.get("_class_name", "").endswith("AvatarPipeline")
                                       else ())
    for name in required:
        if name not in entries or not (folder / name).is_dir():
            raise _error("model", f"{folder} is missing the {name!r} component")


def output_size(request: GenerationRequest) -> tuple[int, int]:
    """(height, width): explicit, else the bucket; `--model tiny` without `--resolution` shrinks the 480P bucket to
    a long side of 256 px so that a CPU run takes seconds."""
    if request.height is not None:
        return request.height, request.width
    height, width = request._media["size"]
    if request.task == "talking_avatar":
        from .pipelines.buckets import avatar_bucket_size

        bucket = avatar_bucket_size(height, width, request.resolution or "480P")
    else:
        bucket = bucket_size(height, width, request.resolution or ("480P" if request.model == "tiny" else "720P"))
    if request.model == "tiny" and request.resolution is None:
        return scale_to_long_side(*bucket, TINY_LONG_SIDE)
    return bucket


def default_output_path(request: GenerationRequest) -> Path:
    return Path("result") / request.task / f"{request.seed}_{time.strftime('%Y-%m-%d_%H-%M-%S')}.mp4"


def load_pipeline(request: GenerationRequest):
    """The task's pipeline: tiny random weights in-process, or a converted folder (bf16, VAE in fp32)."""
    from . import pipelines

    class_name = TASKS[request.task][0]
    if request.model == "tiny":
        print("[skyreels-v3] --model tiny: tiny RANDOM weights, the output is noise (for trying the tools).")
        pipe = tiny_pipeline(request.task, seed=0)
    else:
        from .loading import load_pipeline_folder

        # strict: the folder's pipeline class, every file and every weight checked (wav2vec2 in float32, as in the
        # original; the VAE in float32)
        pipe = load_pipeline_folder(request.model, getattr(pipelines, class_name), {
            "default": torch.bfloat16, "vae": torch.float32, "audio_encoder": torch.float32})
    from .optimization import apply_memory_mode, enable_fast_path, quantize_transformer

    device = request.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if request.quantize is not None:
        quantize_transformer(pipe.transformer, request.quantize, compute_dtype=pipe.transformer.dtype)
    mode = ("low_vram" if request.low_vram else "group" if request.group_offload else
            "sequential" if request.sequential_offload else "offload" if request.offload else "resident")
    apply_memory_mode(pipe, mode, device)
    # xfuser's attention is a graph break (`torch.compiler.disable`): its blocks compile in pieces
    enable_fast_path(pipe, compile=request.compile, attention_backend=request.attention_backend,
                     fullgraph=request.parallel_backend != "xfuser")
    return pipe


def _num_heads(request: GenerationRequest) -> int:
    if request.model == "tiny":
        from .models.configs import TINY_TRANSFORMER_CONFIGS

        return TINY_TRANSFORMER_CONFIGS[TASKS[request.task][1]]["num_attention_heads"]
    config = json.loads((Path(request.model) / "transformer" / "config.json").read_text())
    return config.get("num_attention_heads", 40)


def _validate_everywhere(request: GenerationRequest) -> GenerationRequest:
    """Validate on rank 0 (which alone reads the inputs) and hand the result, or the error, to every rank."""
    import torch.distributed as dist

    from .parallel.context_parallel import broadcast_from_main, check_degrees

    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1 and request.ulysses_degree * request.ring_degree == 1:
        return validate(request)
    outcome = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            validate(request)
            try:
                check_degrees(_num_heads(request), request.ulysses_degree, request.ring_degree, world)
            except ValueError as error:
                raise _error("ulysses_degree", str(error)) from None
            outcome = request
        except ValueError as error:
            outcome = error
    outcome = broadcast_from_main(outcome)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def run(
    request: GenerationRequest,
    pipe=None,
    callback_on_step_end=None,
    callback_on_window_end=None,
    should_stop=None,
) -> Path | None:
    """Validate, load, generate and write the mp4; returns its path (None on ranks other than 0 under torchrun, and
    when `should_stop()` turned true during the run: a cancelled job writes nothing)."""
    from .parallel import enable_context_parallel, enable_xfuser_parallel, init_distributed, is_main_process

    rank, world, device = init_distributed()
    if world > 1 and request.device is None:
        request.device = str(device)
    request = _validate_everywhere(request)
    height, width = output_size(request)
    output = Path(request.output) if request.output else default_output_path(request)
    if output.suffix.lower() != ".mp4":
        raise _error("output", f"must end in .mp4, got {output}")
    pipe = pipe or load_pipeline(request)
    if world > 1 and pipe.transformer._parallel_config is None:  # a reused pipeline (web app) is sharded once
        shard = enable_xfuser_parallel if request.parallel_backend == "xfuser" else enable_context_parallel
        shard(pipe.transformer, request.ulysses_degree, request.ring_degree)
        pipe.set_progress_bar_config(disable=not is_main_process())
    generator = torch.Generator(device="cpu").manual_seed(request.seed)
    common = dict(
        prompt=request.prompt, negative_prompt=request.negative_prompt, height=height, width=width,
        num_inference_steps=request.steps, guidance_scale=request.guidance_scale, generator=generator,
        output_type="np", callback_on_step_end=callback_on_step_end, reproduce_original=request.reproduce_original,
    )
    audio, audio_rate = None, None
    if request.task == "talking_avatar":
        speech = request._media["speech"]
        window_prompt = None if request.prompt_in_every_window else (request.window_prompt or DEFAULT_WINDOW_PROMPT)
        out = pipe(
            image=request._media["image"], audio=speech.source, audio_sample_rate=speech.source_rate,
            window_prompt=window_prompt, clip_from_reference=request.clip_from_reference,
            output_audio=request.output_audio, max_audio_seconds=request.max_audio_seconds,
            resume_dir=request.resume_dir, callback_on_window_end=callback_on_window_end, **common,
        )
        frames, audio, audio_rate = out.frames[0], out.audio, out.audio_sample_rate
    elif request.task == "reference_to_video":
        frames = pipe(
            ref_images=request._media["images"], num_frames=MODEL_FPS * request.duration + 1, **common
        ).frames[0]
    else:
        frames = pipe(
            video=request._media["frames"], duration=request.duration, fps=request.fps,
            resize_mode=request.resize_mode, return_input_video=request.return_input_video, **common,
        ).frames[0]
    if not is_main_process() or (should_stop is not None and should_stop()):
        return None
    return write_video(np.asarray(frames), output, fps=request.fps, audio=audio, audio_sample_rate=audio_rate,
                       crf=request.crf)


def request_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(GenerationRequest) if not f.name.startswith("_")]
