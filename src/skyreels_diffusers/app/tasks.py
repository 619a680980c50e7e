"""The one registry of what a SkyReels-V3 task is: its pipeline, transformer variant, scheduler, every default a front
door uses, its UI label and inputs, the original repository holding it, its example inputs, and how a request's
values become pipeline arguments.

The command line, the web app, the torchrun path, the converter, the tiny pipelines and the benchmarks all read
`TASKS`; nothing else branches on a task's name or repeats one of its defaults. A new task is one `TaskSpec` here
(and its pipeline file).

The defaults are the original `generate_video.py`'s (reference-to-video: `generate_video(...)` with 8 steps,
guidance 1.0 and the UniPC flow shift 5; both extensions: 8 steps, guidance 1.0, shift 8; the avatar:
`sampling_steps=4`, text and audio guidance 1.0, shift 11, `frame_num=81`, `motion_frame=5`, `drop_frame=12`;
`--duration 5`; 24 fps, the avatar 25 fps), except where `docs/fidelity.md` gives the reason for another value
(`TaskDefaults.original_resolution`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image

from ..errors import InputError
from ..pipelines.audio_io import DEFAULT_MAX_SECONDS, SpeechAudio
from ..pipelines.buckets import avatar_bucket_size, bucket_size
from ..pipelines.pipeline_skyreels_v3_extension import NUM_CONDITION_FRAMES, SkyReelsV3ExtensionPipeline
from ..pipelines.pipeline_skyreels_v3_reference import MAX_NUM_FRAMES, SkyReelsV3ReferencePipeline
from ..pipelines.pipeline_skyreels_v3_shot_switching import (
    SHOT_NUM_CONDITION_FRAMES_MAP,
    SkyReelsV3ShotSwitchingPipeline,
)
from ..pipelines.pipeline_skyreels_v3_talking_avatar import DEFAULT_WINDOW_PROMPT, SkyReelsV3TalkingAvatarPipeline
from ..schedulers import SkyReelsV3FlowEulerScheduler, SkyReelsV3FlowUniPCScheduler


#: the original's `--prompt` and `--seed` defaults (the same for every task)
DEFAULT_PROMPT = "A man is making his way forward slowly, leaning on a white cane to prop himself up."
DEFAULT_SEED = 42


@dataclass(frozen=True, kw_only=True)
class TaskDefaults:
    """What a run of the task uses when the user does not say: the original's values unless `docs/fidelity.md`
    gives the reason for another (then the original's is kept beside it, for `--reproduce-original`)."""

    steps: int  # denoising steps (per clip for the avatar); the checkpoints are step-distilled for them
    guidance_scale: float  # text guidance (1.0 = off)
    image_guidance_scale: float | None = None  # reference-to-video's image guidance (`guidance_scale_img`)
    audio_guidance_scale: float | None = None  # the avatar's audio guidance
    shift: float  # the flow scheduler's timestep shift
    fps: int  # frame rate of the written video (and of the extension's duration)
    duration: int | None  # seconds; None: the length of the input audio
    resolution: str  # bucket table of the output size
    original_resolution: str | None = None  # the original's, where `resolution` differs on purpose
    window_frames: int | None = None  # the avatar's frames per clip (`frame_num`)
    motion_frames: int | None = None  # frames each window continues from (`motion_frame`)
    dropped_frames: int | None = None  # frames dropped at the end of every window but the last (`drop_frame`)
    window_prompt: str | None = None  # prompt of the avatar's sliding windows (the original's connection prompt)
    max_audio_seconds: float | None = None  # longest input audio


@dataclass(frozen=True)
class Media:
    """A request's decoded inputs: what `TaskSpec.load_inputs` reads from the request's files and
    `TaskSpec.example_inputs` builds for `--model tiny` without inputs."""

    ref_images: tuple[PIL.Image.Image, ...] = ()  # reference-to-video
    video: np.ndarray | None = None  # the extensions: uint8 [F, H, W, 3], the tail the pipelines read
    video_fps: float | None = None  # the input video's frame rate (None when unknown)
    portrait: PIL.Image.Image | None = None  # the avatar's image
    speech: SpeechAudio | None = None  # the avatar's audio

    def size(self) -> tuple[int, int] | None:
        """(height, width) of the input that picks the output's bucket (None without one)."""
        image = self.ref_images[0] if self.ref_images else self.portrait
        if image is not None:
            return image.height, image.width
        if self.video is not None:
            return tuple(self.video.shape[1:3])
        return None


@dataclass(frozen=True)
class RepoLayout:
    """Where an original Hugging Face repository keeps the components its pipelines share (paths relative to its
    root): a transformers / diffusers folder, or a Wan-native `.pth` file that the converter rewrites."""

    tokenizer: str
    text_encoder: str  # a `UMT5EncoderModel` folder, or `models_t5_umt5-xxl-enc-bf16.pth`
    vae: str  # an `AutoencoderKLWan` folder, or `Wan2.1_VAE.pth`
    image_encoder: str | None = None  # the open-clip `.pth` (avatar)
    audio_encoder: str | None = None  # the wav2vec2 folder (avatar)


#: `scripts/convert_checkpoints.py repo --task` -> the repository's layout
REPO_LAYOUTS: dict[str, RepoLayout] = {
    "reference_to_video": RepoLayout(tokenizer="tokenizer", text_encoder="text_encoder", vae="vae"),
    "video_extension": RepoLayout(
        tokenizer="google/umt5-xxl", text_encoder="models_t5_umt5-xxl-enc-bf16.pth", vae="Wan2.1_VAE.pth"
    ),
    "talking_avatar": RepoLayout(
        tokenizer="google/umt5-xxl",
        text_encoder="models_t5_umt5-xxl-enc-bf16.pth",
        vae="Wan2.1_VAE.pth",
        image_encoder="models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
        audio_encoder="chinese-wav2vec2-base",
    ),
}


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One task. The callables take the validated request (`app.request.GenerationRequest`: its fields, its
    `media` and `fps`), so that the registry needs nothing of the request layer."""

    name: str
    label: str  # the web app's tab
    pipeline_class: type
    variant: str  # transformer configuration: "reference", "extension" or "avatar"
    defaults: TaskDefaults
    inputs: tuple[str, ...]  # the request fields holding its input files (the web app's upload widgets)
    # the other request fields only this task reads (`call_kwargs`, the duration): a request of another task that sets
    # one is refused (a flag that would do nothing)
    options: tuple[str, ...] = ()
    repo: str  # `scripts/convert_checkpoints.py repo --task` of the original repository holding it
    transformer_folder: str  # where its transformer lies in that repository ("." = the root)
    windowed: bool = False  # generates window by window (`callback_on_window_end`, resumable)
    max_frames: int | None = None  # the most frames one call generates, where the pipeline counts frames
    scheduler: Callable[[TaskSpec], Any]  # the task's scheduler, built from the defaults
    bucket: Callable[[int, int, str], tuple[int, int]]  # (input height, width, resolution) -> output size
    load_inputs: Callable[[Any], Media]  # the request's files, decoded (errors name request fields)
    example_inputs: Callable[[], Media]  # built-in inputs for `--model tiny` without files
    call_kwargs: Callable[[Any], dict]  # the task's own pipeline arguments for a validated request
    embeddings: Callable[..., dict]  # encoder outputs that replace the pipeline's encoder calls (torchrun)

    def make_scheduler(self):
        return self.scheduler(self)

    def check_inputs(self, kwargs: dict) -> None:
        """The pipeline's own checks (no weights) on the arguments a call with `kwargs` would make."""
        accepted = inspect.signature(self.pipeline_class.check_inputs).parameters
        self.pipeline_class.check_inputs(**{k: v for k, v in kwargs.items() if k in accepted})


# ---------------------------------------------------------------------------------------------- schedulers
def _flow_unipc(spec: TaskSpec) -> SkyReelsV3FlowUniPCScheduler:
    """UniPC on the original's flow sigmas (`flow_sigma_max` as the task's original computed it)."""
    return SkyReelsV3FlowUniPCScheduler(
        flow_shift=spec.defaults.shift, flow_sigma_max=spec.pipeline_class._flow_sigma_max
    )


def _flow_euler(spec: TaskSpec) -> SkyReelsV3FlowEulerScheduler:
    return SkyReelsV3FlowEulerScheduler(shift=spec.defaults.shift)


# ---------------------------------------------------------------------------------------------- example inputs
def _example_images() -> Media:
    """Two reference images (portrait and landscape discs)."""
    images = []
    for height, width, colour in ((480, 360, (220, 120, 140)), (360, 480, (150, 110, 60))):
        y, x = np.mgrid[0:height, 0:width]
        disc = ((y - height / 2) ** 2 + (x - width / 2) ** 2) < (min(height, width) / 3) ** 2
        array = np.full((height, width, 3), 245, np.uint8)
        array[disc] = colour
        images.append(PIL.Image.fromarray(array))
    return Media(ref_images=tuple(images))


def _example_video() -> Media:
    """A 2-second 24 fps clip of a moving disc."""
    frames = np.full((48, 144, 256, 3), 235, np.uint8)
    y, x = np.mgrid[0:144, 0:256]
    for i, frame in enumerate(frames):
        frame[((y - 72) ** 2 + (x - 40 - 3.5 * i) ** 2) < 30**2] = (60, 110, 200)
    return Media(video=frames, video_fps=24.0)


def speech_like(seconds: float, rate: int = 16000) -> np.ndarray:
    """A voiced, syllable-modulated tone: enough for the tiny pipeline's audio path (not speech)."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voice = np.sin(2 * np.pi * np.cumsum(pitch) / rate) + 0.4 * np.sin(4 * np.pi * np.cumsum(pitch) / rate)
    return (0.2 * voice * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def _example_portrait() -> Media:
    """A drawn face and 3.5 s of a speech-like tone."""
    from ..pipelines.audio_io import load_speech

    y, x = np.mgrid[0:480, 0:360]
    face = np.full((480, 360, 3), 240, np.uint8)
    face[((y - 220) / 150) ** 2 + ((x - 180) / 110) ** 2 < 1] = (225, 180, 150)
    face[((y - 300) / 18) ** 2 + ((x - 180) / 45) ** 2 < 1] = (150, 60, 60)
    return Media(
        portrait=PIL.Image.fromarray(face), speech=load_speech(speech_like(3.5), sample_rate=16000, name="input_audio")
    )


# ---------------------------------------------------------------------------------------------- request files
def _load_reference_images(request) -> Media:
    from ..pipelines.video_io import load_image

    refs = [p.strip() for item in request.ref_imgs for p in str(item).split(",") if p.strip()]
    SkyReelsV3ReferencePipeline.check_reference_count(refs)  # before any of them is opened
    drop_alpha = request.reproduce_original  # the original's convert("RGB"): transparent pixels keep their colour
    return Media(ref_images=tuple(load_image(path, name="ref_imgs", drop_alpha=drop_alpha) for path in refs))


#: the most input frames an extension reads (the condition frames; every frame with --return-input-video)
VIDEO_TAIL_FRAMES = max(NUM_CONDITION_FRAMES, *SHOT_NUM_CONDITION_FRAMES_MAP.values())


def _load_input_video(request) -> Media:
    from ..pipelines.video_io import load_video_tail

    if request.input_video is None:
        raise InputError("input_video", "is required for the extension tasks")
    frames, source_fps = load_video_tail(
        request.input_video, None if request.return_input_video else VIDEO_TAIL_FRAMES, name="input_video"
    )
    return Media(video=frames, video_fps=source_fps)


def _load_portrait_and_speech(request) -> Media:
    from ..pipelines.audio_io import load_speech
    from ..pipelines.video_io import load_image

    for name in ("input_image", "input_audio"):
        if getattr(request, name) is None:
            raise InputError(name, f"is required for {request.task}")
    return Media(
        portrait=load_image(request.input_image, name="input_image", drop_alpha=request.reproduce_original),
        speech=load_speech(request.input_audio, max_seconds=request.max_audio_seconds, name="input_audio"),
    )


# ---------------------------------------------------------------------------------------------- request -> call
def _reference_kwargs(request) -> dict:
    return {
        "ref_images": list(request.media.ref_images),
        "num_frames": request.fps * request.duration + 1,
        "guidance_scale_img": request.spec.defaults.image_guidance_scale,
    }


def _extension_kwargs(request) -> dict:
    return {
        "video": request.media.video,
        "duration": request.duration,
        "fps": request.fps,
        "resize_mode": request.resize_mode,
        "return_input_video": request.return_input_video,
    }


def _avatar_kwargs(request) -> dict:
    defaults = request.spec.defaults
    window_prompt = None if request.prompt_in_every_window else (request.window_prompt or defaults.window_prompt)
    return {
        "image": request.media.portrait,
        "audio": request.media.speech,
        "audio_guidance_scale": defaults.audio_guidance_scale,
        "window_prompt": window_prompt,
        "clip_from_reference": request.clip_from_reference,
        "output_audio": request.output_audio,
        "max_audio_seconds": request.max_audio_seconds,
        "resume_dir": request.resume_dir,
    }


# ---------------------------------------------------------------------------------------------- encoders once
def _text_embeddings(pipe, prompt, negative_prompt, guidance_scale: float, **_) -> dict:
    """UMT5 embeddings of the prompt (and the negative prompt with guidance)."""
    embeds, negative = pipe.encode_prompt(prompt, negative_prompt, guidance_scale > 1.0)
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative}


def _avatar_embeddings(
    pipe,
    prompt,
    negative_prompt,
    guidance_scale: float,
    *,
    window_prompt: str | None = None,
    portrait=None,
    speech=None,
    height: int | None = None,
    width: int | None = None,
) -> dict:
    """The avatar's own prompt rules (its negative prompt, the window prompt), the portrait's CLIP tokens and the
    wav2vec2 features of `speech`."""
    embeds, negative, window = pipe.encode_prompts(
        prompt, negative_prompt, window_prompt, None, None, None, guidance_scale > 1.0, 512
    )
    out = {"prompt_embeds": embeds, "negative_prompt_embeds": negative, "window_prompt_embeds": window}
    reference = pipe.prepare_portrait(portrait, height, width).to(pipe._execution_device)[0, :, 0]
    out["image_embeds"] = pipe.encode_image(reference[None])
    out["audio_embeds"] = pipe.encode_audio(speech)
    return out


# ---------------------------------------------------------------------------------------------- the registry
_EXTENSION_DEFAULTS = TaskDefaults(steps=8, guidance_scale=1.0, shift=8.0, fps=24, duration=5, resolution="720P")
_EXTENSION = dict(
    variant="extension",
    defaults=_EXTENSION_DEFAULTS,
    inputs=("input_video",),
    options=("duration", "keep_source_fps", "resize_mode", "return_input_video"),
    repo="video_extension",
    scheduler=_flow_unipc,
    bucket=bucket_size,
    load_inputs=_load_input_video,
    example_inputs=_example_video,
    call_kwargs=_extension_kwargs,
    embeddings=_text_embeddings,
)

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="reference_to_video",
            label="Reference to video",
            pipeline_class=SkyReelsV3ReferencePipeline,
            variant="reference",
            defaults=TaskDefaults(
                steps=8,
                guidance_scale=1.0,
                image_guidance_scale=1.0,
                shift=5.0,
                fps=24,
                duration=5,
                resolution="720P",
            ),
            inputs=("ref_imgs",),
            options=("duration",),
            repo="reference_to_video",
            transformer_folder="transformer",
            max_frames=MAX_NUM_FRAMES,
            scheduler=_flow_unipc,
            bucket=bucket_size,
            load_inputs=_load_reference_images,
            example_inputs=_example_images,
            call_kwargs=_reference_kwargs,
            embeddings=_text_embeddings,
        ),
        TaskSpec(
            name="single_shot_extension",
            label="Single-shot extension",
            pipeline_class=SkyReelsV3ExtensionPipeline,
            transformer_folder="transformer",
            **_EXTENSION,
        ),
        TaskSpec(
            name="shot_switching_extension",
            label="Shot switching",
            pipeline_class=SkyReelsV3ShotSwitchingPipeline,
            transformer_folder="shot_transformer",
            **_EXTENSION,
        ),
        TaskSpec(
            name="talking_avatar",
            label="Talking avatar",
            pipeline_class=SkyReelsV3TalkingAvatarPipeline,
            variant="avatar",
            defaults=TaskDefaults(
                steps=4,
                guidance_scale=1.0,
                audio_guidance_scale=1.0,
                shift=11.0,
                fps=25,
                duration=None,
                resolution="480P",
                original_resolution="720P",
                window_frames=81,
                motion_frames=5,
                dropped_frames=12,
                window_prompt=DEFAULT_WINDOW_PROMPT,
                max_audio_seconds=DEFAULT_MAX_SECONDS,
            ),
            inputs=("input_image", "input_audio"),
            options=(
                "window_prompt",
                "prompt_in_every_window",
                "clip_from_reference",
                "output_audio",
                "max_audio_seconds",
                "resume_dir",
            ),
            repo="talking_avatar",
            transformer_folder=".",
            windowed=True,
            scheduler=_flow_euler,
            bucket=avatar_bucket_size,
            load_inputs=_load_portrait_and_speech,
            example_inputs=_example_portrait,
            call_kwargs=_avatar_kwargs,
            embeddings=_avatar_embeddings,
        ),
    )
}
#: original repositories (`convert_checkpoints.py repo --task`) -> the tasks whose pipelines they hold
REPOS: dict[str, list[str]] = {}
for _spec in TASKS.values():
    REPOS.setdefault(_spec.repo, []).append(_spec.name)


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise InputError("task", f"must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]


def per_task(describe: Callable[[TaskSpec], Any]) -> str:
    """ "reference_to_video 8, single_shot_extension 8, ...": a value of each task that has one (not None; the CLI's
    --help)."""
    values = {name: describe(spec) for name, spec in TASKS.items()}
    return ", ".join(
        f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"
        for name, value in values.items()
        if value is not None
    )
