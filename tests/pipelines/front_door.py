"""The front door on the pipeline golden cases: what `skyreels-v3 generate --task T --model tiny --reproduce-original`
runs for a case's inputs and flags (the original's flags for that case; no step, guidance or shift flag: those come
from the task registry), through the request layer (`cli.generation_request`, `request.validate`,
`run.call_arguments` / `run.generate`), on the pipeline built from the case's fixture components.

The fixtures bypass the text encoder (and the avatar's wav2vec2) with stored embeddings; they reach the pipeline the
way the torchrun path hands precomputed embeddings to it (`generate(..., embeddings=...)`). One such run per case
serves both the pipeline-level golden test and the front-door golden test of the case (`RunCache`): the expensive
part (8 steps and a VAE decode of up to 168 frames on a CPU) runs once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from skyreels_diffusers.app.cli import build_parser, generation_request
from skyreels_diffusers.app.request import GenerationRequest, output_size, validate
from skyreels_diffusers.app.run import GeneratedVideo, call_arguments, generate
from tests.original_defaults import ORIGINAL, scheduler_shift


@dataclass
class FrontDoorRun:
    """One golden case through the front door."""

    request: GenerationRequest  # validated: the task's defaults filled in
    kwargs: dict  # the pipeline call the request layer makes
    video: GeneratedVideo  # what `run` writes: frames in [0, 1] and the muxed audio
    pipe: Any
    recorder: Any  # the pipeline-level test's recorder (transformer inputs, latents after every step)


def front_door_argv(task: str, *flags: str) -> list[str]:
    return ["generate", "--task", task, "--model", "tiny", "--reproduce-original", *flags]


def run_front_door(argv: list[str], pipe, embeddings: dict, recorder) -> FrontDoorRun:
    """Parse `argv` as the CLI does, validate, and generate with `pipe` (the CLI would load it: `--model tiny` here
    only keeps the request from looking for a folder); `recorder` is the step callback."""
    request = validate(generation_request(build_parser().parse_args(argv)))
    kwargs = call_arguments(request, output_size(request), embeddings, recorder)
    video = generate(request, pipe, callback_on_step_end=recorder, embeddings=embeddings)
    return FrontDoorRun(request, kwargs, video, pipe, recorder)


class RunCache:
    """`cache(task)`: what `build(task)` returns (the case and its front-door run), built on first use and kept (a
    module-scoped fixture holds it)."""

    def __init__(self, build: Callable[[str], Any]):
        self.build, self.runs = build, {}

    def __call__(self, task: str) -> FrontDoorRun:
        if task not in self.runs:
            self.runs[task] = self.build(task)
        return self.runs[task]


def assert_original_call(run: FrontDoorRun, task: str) -> None:
    """The settings the request layer chose with no flag for them are the original `generate_video.py`'s: steps,
    guidance scales, the scheduler's shift, the output frame rate; and `--reproduce-original` reached the pipeline."""
    original = ORIGINAL[task]
    kwargs = run.kwargs
    assert kwargs["num_inference_steps"] == original["steps"], (task, kwargs["num_inference_steps"])
    assert kwargs["guidance_scale"] == original["guidance_scale"]
    if "image_guidance_scale" in original:
        assert kwargs["guidance_scale_img"] == original["image_guidance_scale"]
    if "audio_guidance_scale" in original:
        assert kwargs["audio_guidance_scale"] == original["audio_guidance_scale"]
    assert scheduler_shift(run.pipe.scheduler) == original["shift"]
    assert run.request.fps == original["fps"] and kwargs["reproduce_original"] is True
    assert kwargs["generator"].initial_seed() == run.request.seed
