"""The pipeline call each front door makes with no setting given, against the original `generate_video.py`'s values
(`tests/original_defaults.py`, read off the original's code): `skyreels-v3 generate --task T --model tiny`, the web
app's tab as it opens, and the torchrun path (`torchrun ... -m skyreels_diffusers.app.cli generate`).

Each runs the real front-door code (argument parsing, request, validation, the call, writing the mp4); only the
pipeline's denoising is replaced by a recorder of its arguments (the encoders stay real: the torchrun path runs them
once and hands the embeddings over). Before: the command line ran the avatar with 8 steps, and the web app
generated 1 s of reference-to-video and single-shot extension and 2 s of shot switching (the original: 5 s).
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from skyreels_diffusers.app.cli import main
from skyreels_diffusers.app.tasks import TASKS
from skyreels_diffusers.app.tiny import tiny_pipeline
from skyreels_diffusers.pipelines import pipeline_skyreels_v3_talking_avatar as avatar_module
from tests.original_defaults import DOCUMENTED_DIFFERENCES, ORIGINAL, scheduler_shift


class RecordingPipeline:
    """A tiny pipeline whose `__call__` (or, for a task made window by window, `windows`) records its arguments and
    returns one black 16 x 16 frame; every other attribute (encoders, scheduler, progress bar) is the real
    pipeline's."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return SimpleNamespace(frames=np.zeros((1, 1, 16, 16, 3), np.float32))

    def windows(self, **kwargs):
        self.calls.append(kwargs)
        return RecordedRun(fps=avatar_module.VIDEO_FPS)


class RecordedRun:
    """What `windows(...)` returns, as far as the writer reads it: one window of one black 16 x 16 frame."""

    def __init__(self, fps: int):
        self.fps, self.audio, self.audio_sample_rate = fps, None, None

    def __iter__(self):
        yield SimpleNamespace(frames=np.zeros((1, 16, 16, 3), np.uint8))


@pytest.fixture(scope="module")
def tiny_pipes():
    return {task: tiny_pipeline(task) for task in TASKS}


def original_value(task: str, name: str):
    return DOCUMENTED_DIFFERENCES.get((task, name), ORIGINAL[task][name])


def effective_arguments(task: str, kwargs: dict) -> dict:
    """The call's arguments with the pipeline's own defaults for those it leaves out."""
    signature = inspect.signature(TASKS[task].pipeline_class.__call__)
    defaults = {name: p.default for name, p in signature.parameters.items() if p.default is not p.empty}
    return {**defaults, **kwargs}


def assert_original_call(task: str, kwargs: dict, pipe, written) -> None:
    """The recorded call (and the written file's frame rate) against the original's values."""
    original = ORIGINAL[task]
    kwargs = effective_arguments(task, kwargs)
    assert kwargs["num_inference_steps"] == original["steps"], (task, kwargs["num_inference_steps"])
    assert kwargs["guidance_scale"] == original["guidance_scale"]
    assert kwargs["resolution"] == original_value(task, "resolution")
    assert scheduler_shift(pipe.scheduler) == original["shift"]
    if "image_guidance_scale" in original:
        assert kwargs["guidance_scale_img"] == original["image_guidance_scale"]
    if "audio_guidance_scale" in original:
        assert kwargs["audio_guidance_scale"] == original["audio_guidance_scale"]
    if task == "reference_to_video":
        assert kwargs["num_frames"] == original["duration"] * original["fps"] + 1, kwargs["num_frames"]
    elif "duration" in original:
        assert (kwargs["duration"], kwargs["fps"]) == (original["duration"], original["fps"])
    with av.open(str(written)) as container:
        assert float(container.streams.video[0].average_rate) == original["fps"]


def cli_call(task, tmp_path, monkeypatch, pipe) -> tuple[dict, object]:
    import skyreels_diffusers.app.run as run_module

    recording = RecordingPipeline(pipe)
    monkeypatch.setattr(run_module, "load_pipeline", lambda request: recording)
    out = tmp_path / f"{task}.mp4"
    assert main(["generate", "--task", task, "--model", "tiny", "--output", str(out)]) == 0
    assert len(recording.calls) == 1
    return recording.calls[0], out


@pytest.mark.parametrize("task", list(TASKS))
def test_the_command_line_runs_the_originals_settings(task, tmp_path, monkeypatch, tiny_pipes):
    """`skyreels-v3 generate --task T --model tiny` (built-in inputs) and nothing else."""
    kwargs, out = cli_call(task, tmp_path, monkeypatch, tiny_pipes[task])
    assert_original_call(task, kwargs, tiny_pipes[task], out)
    if task == "talking_avatar":
        assert kwargs["window_prompt"] == ORIGINAL[task]["window_prompt"]


@pytest.mark.parametrize("task", list(TASKS))
def test_the_torchrun_path_runs_the_originals_settings(task, tmp_path, monkeypatch, tiny_pipes):
    """The same command under torchrun (2 processes, as rank 0 sees it): the encoders run once and their outputs
    replace the prompts; every other argument is the one-process call's."""
    import skyreels_diffusers.app.distributed as distributed
    import skyreels_diffusers.parallel as parallel

    monkeypatch.setattr(parallel, "init_distributed", lambda: (0, 2, torch.device("cpu")))
    monkeypatch.setattr(distributed, "parallelize", lambda *args, **kwargs: None)
    kwargs, out = cli_call(task, tmp_path, monkeypatch, tiny_pipes[task])
    assert kwargs["prompt"] is None and kwargs["prompt_embeds"] is not None  # encoded once, on rank 0
    assert_original_call(task, kwargs, tiny_pipes[task], out)
    if task == "talking_avatar":
        assert kwargs["audio"] is None and kwargs["audio_embeds"] is not None
        assert kwargs["window_prompt_embeds"] is not None


@pytest.mark.parametrize("task", list(TASKS))
def test_the_web_app_runs_the_originals_settings(task, tmp_path, tiny_pipes):
    """A tab's Generate pressed as the tab opens (its default values; built-in inputs with the tiny model)."""
    from skyreels_diffusers.app.web import JobRunner, build_request, form_defaults

    runner = JobRunner()
    recording = runner.pipes[task] = RecordingPipeline(tiny_pipes[task])
    written = runner(build_request(task, form_defaults(task), "tiny", tmp_path))
    assert len(recording.calls) == 1
    assert_original_call(task, recording.calls[0], tiny_pipes[task], written)


def test_the_avatar_windows_are_the_originals():
    """Frames per clip, motion frames and dropped frames: the registry's, the pipeline's and the original's."""
    defaults = TASKS["talking_avatar"].defaults
    original = ORIGINAL["talking_avatar"]
    ours = (defaults.window_frames, defaults.motion_frames, defaults.dropped_frames)
    assert ours == (original["window_frames"], original["motion_frames"], original["dropped_frames"])
    assert ours == (avatar_module.WINDOW_FRAMES, avatar_module.MOTION_FRAMES, avatar_module.DROP_FRAMES)
    # the original stops at 5000 frames (200 s at 25 fps): the longest audio accepted here
    assert defaults.max_audio_seconds * defaults.fps == original["max_frames"]


def test_reproduce_original_takes_the_originals_resolution(tmp_path):
    """Where a default differs on purpose (docs/fidelity.md), `--reproduce-original` takes the original's."""
    from skyreels_diffusers.app.request import GenerationRequest, with_task_defaults

    for (task, name), ours in DOCUMENTED_DIFFERENCES.items():
        request = GenerationRequest(task=task, model=str(tmp_path))
        assert getattr(with_task_defaults(request), name) == ours
        reproduce = with_task_defaults(GenerationRequest(task=task, model=str(tmp_path), reproduce_original=True))
        assert getattr(reproduce, name) == ORIGINAL[task][name]
