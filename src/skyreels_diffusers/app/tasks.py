"""The one registry of what a SkyReels-V3 task is: its pipeline, transformer variant, scheduler, frame rate, defaults,
UI label, original checkpoint location, example inputs and how a request's arguments become pipeline arguments.

The CLI's choices, the web app's tabs, the converter, the tiny pipelines and the benchmarks all read `TASKS`: a new
task is one `TaskSpec` here (and its pipeline file).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image

from ..pipelines.pipeline_skyreels_v3_extension import SkyReelsV3ExtensionPipeline
from ..pipelines.pipeline_skyreels_v3_reference import SkyReelsV3ReferencePipeline
from ..pipelines.pipeline_skyreels_v3_shot_switching import SkyReelsV3ShotSwitchingPipeline
from ..pipelines.pipeline_skyreels_v3_talking_avatar import DEFAULT_WINDOW_PROMPT, SkyReelsV3TalkingAvatarPipeline
from ..schedulers import SkyReelsV3FlowEulerScheduler, SkyReelsV3FlowUniPCScheduler


@dataclass(frozen=True)
class TaskSpec:
    """One task. `call_kwargs(request)` maps a validated request (anything with the request's attributes and its
    decoded `media`) to the pipeline's keyword arguments."""

    name: str
    label: str
    pipeline_class: type
    variant: str  # transformer configuration: "reference", "extension" or "avatar"
    shift: float  # the scheduler's timestep shift
    fps: int  # frame rate of the written video
    default_steps: int
    default_duration: int  # seconds (0: given by the audio)
    repo: str  # `scripts/convert_checkpoints.py repo --task` of the original repository holding it
    transformer_folder: str  # where its transformer lies in that repository ("." = the root)
    example_media: Callable[[], dict]
    call_kwargs: Callable[[Any], dict]

    def make_scheduler(self):
        if self.pipeline_class is SkyReelsV3TalkingAvatarPipeline:
            return SkyReelsV3FlowEulerScheduler(shift=self.shift)
        return SkyReelsV3FlowUniPCScheduler(flow_shift=self.shift, flow_sigma_max=self.pipeline_class._flow_sigma_max)

    def check_inputs(self, kwargs: dict) -> None:
        """The pipeline's own checks (no weights) on the arguments a call with `kwargs` would make."""
        accepted = inspect.signature(self.pipeline_class.check_inputs).parameters
        self.pipeline_class.check_inputs(**{k: v for k, v in kwargs.items() if k in accepted})


# ---------------------------------------------------------------------------------------------- example inputs
def _example_images() -> dict:
    """Two reference images (portrait and landscape discs)."""
    images = []
    for height, width, colour in ((480, 360, (220, 120, 140)), (360, 480, (150, 110, 60))):
        y, x = np.mgrid[0:height, 0:width]
        disc = ((y - height / 2) ** 2 + (x - width / 2) ** 2) < (min(height, width) / 3) ** 2
        array = np.full((height, width, 3), 245, np.uint8)
        array[disc] = colour
        images.append(PIL.Image.fromarray(array))
    return {"images": images}


def _example_video() -> dict:
    """A 2-second 24 fps clip of a moving disc."""
    frames = np.full((48, 144, 256, 3), 235, np.uint8)
    y, x = np.mgrid[0:144, 0:256]
    for i, frame in enumerate(frames):
        frame[((y - 72) ** 2 + (x - 40 - 3.5 * i) ** 2) < 30**2] = (60, 110, 200)
    return {"frames": frames}


def speech_like(seconds: float, rate: int = 16000) -> np.ndarray:
    """A voiced, syllable-modulated tone: enough for the tiny pipeline's audio path (not speech)."""
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    voice = np.sin(2 * np.pi * np.cumsum(pitch) / rate) + 0.4 * np.sin(4 * np.pi * np.cumsum(pitch) / rate)
    return (0.2 * voice * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def _example_portrait() -> dict:
    """A drawn face and 3.5 s of a speech-like tone."""
    from ..pipelines.audio_io import load_speech

    y, x = np.mgrid[0:480, 0:360]
    face = np.full((480, 360, 3), 240, np.uint8)
    face[((y - 220) / 150) ** 2 + ((x - 180) / 110) ** 2 < 1] = (225, 180, 150)
    face[((y - 300) / 18) ** 2 + ((x - 180) / 45) ** 2 < 1] = (150, 60, 60)
    return {
        "image": PIL.Image.fromarray(face),
        "speech": load_speech(speech_like(3.5), sample_rate=16000, name="input_audio"),
    }


# ---------------------------------------------------------------------------------------------- request -> call
def _reference_kwargs(request) -> dict:
    return {"ref_images": request.media["images"], "num_frames": request.fps * request.duration + 1}


def _extension_kwargs(request) -> dict:
    return {
        "video": request.media["frames"],
        "duration": request.duration,
        "fps": request.fps,
        "resize_mode": request.resize_mode,
        "return_input_video": request.return_input_video,
    }


def _avatar_kwargs(request) -> dict:
    speech = request.media["speech"]
    window_prompt = None if request.prompt_in_every_window else (request.window_prompt or DEFAULT_WINDOW_PROMPT)
    return {
        "image": request.media["image"],
        "audio": speech,
        "window_prompt": window_prompt,
        "clip_from_reference": request.clip_from_reference,
        "output_audio": request.output_audio,
        "max_audio_seconds": request.max_audio_seconds,
        "resume_dir": request.resume_dir,
    }


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "reference_to_video",
            "Reference to video",
            SkyReelsV3ReferencePipeline,
            "reference",
            5.0,
            24,
            8,
            1,
            "reference_to_video",
            "transformer",
            _example_images,
            _reference_kwargs,
        ),
        TaskSpec(
            "single_shot_extension",
            "Single-shot extension",
            SkyReelsV3ExtensionPipeline,
            "extension",
            8.0,
            24,
            8,
            1,
            "video_extension",
            "transformer",
            _example_video,
            _extension_kwargs,
        ),
        TaskSpec(
            "shot_switching_extension",
            "Shot switching",
            SkyReelsV3ShotSwitchingPipeline,
            "extension",
            8.0,
            24,
            8,
            2,
            "video_extension",
            "shot_transformer",
            _example_video,
            _extension_kwargs,
        ),
        TaskSpec(
            "talking_avatar",
            "Talking avatar",
            SkyReelsV3TalkingAvatarPipeline,
            "avatar",
            11.0,
            25,
            4,
            0,
            "talking_avatar",
            ".",
            _example_portrait,
            _avatar_kwargs,
        ),
    )
}
#: original repositories (`convert_checkpoints.py repo --task`) -> the tasks whose pipelines they hold
REPOS: dict[str, list[str]] = {}
for _spec in TASKS.values():
    REPOS.setdefault(_spec.repo, []).append(_spec.name)


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"`task` must be one of {sorted(TASKS)}, got {name!r}.")
    return TASKS[name]
