"""The task registry (`app/tasks.py`) is the one place a task's facts live: built with keywords, its defaults equal
to each pipeline's own signature defaults, the original's unless documented, and the command line's flags defer to
it."""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path

import pytest

from skyreels_diffusers.app.cli import build_parser
from skyreels_diffusers.app.tasks import TASKS, TaskDefaults, TaskSpec
from skyreels_diffusers.pipelines import pipeline_skyreels_v3_talking_avatar as avatar_module
from tests.original_defaults import DOCUMENTED_DIFFERENCES, ORIGINAL, scheduler_shift


ROOT = Path(__file__).resolve().parents[2]

#: registry default -> the pipeline `__call__` argument it must equal (the pipeline's own default), per task
SIGNATURE_ARGUMENTS = {
    "reference_to_video": {
        "steps": "num_inference_steps",
        "guidance_scale": "guidance_scale",
        "image_guidance_scale": "guidance_scale_img",
        "resolution": "resolution",
    },
    "single_shot_extension": {
        "steps": "num_inference_steps",
        "guidance_scale": "guidance_scale",
        "duration": "duration",
        "resolution": "resolution",
    },
    "talking_avatar": {
        "steps": "num_inference_steps",
        "guidance_scale": "guidance_scale",
        "audio_guidance_scale": "audio_guidance_scale",
        "resolution": "resolution",
        "window_prompt": "window_prompt",
        "max_audio_seconds": "max_audio_seconds",
    },
}
SIGNATURE_ARGUMENTS["shot_switching_extension"] = SIGNATURE_ARGUMENTS["single_shot_extension"]


def test_specs_and_defaults_take_keywords_only():
    with pytest.raises(TypeError):
        TaskDefaults(8, 1.0, None, None, 8.0, 24, 5, "720P")
    spec = TASKS["reference_to_video"]
    values = [getattr(spec, f.name) for f in dataclasses.fields(TaskSpec)]
    with pytest.raises(TypeError):
        TaskSpec(*values)
    assert TaskSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(TaskSpec)}) == spec


@pytest.mark.parametrize("task", list(TASKS))
def test_pipeline_signature_defaults_equal_the_registry(task):
    """Field by field: a notebook user calling the pipeline with no arguments gets the command line's defaults."""
    spec = TASKS[task]
    defaults = spec.defaults
    parameters = inspect.signature(spec.pipeline_class.__call__).parameters
    for name, argument in SIGNATURE_ARGUMENTS[task].items():
        assert parameters[argument].default == getattr(defaults, name), (task, name, argument)
    if "num_frames" in parameters:  # counted in frames: fps * duration + 1
        assert parameters["num_frames"].default == defaults.fps * defaults.duration + 1
    if spec.windowed:
        windows = (avatar_module.WINDOW_FRAMES, avatar_module.MOTION_FRAMES, avatar_module.DROP_FRAMES)
        assert windows == (defaults.window_frames, defaults.motion_frames, defaults.dropped_frames)
    scheduler_class = typing.get_type_hints(spec.pipeline_class.__init__)["scheduler"]
    scheduler = spec.make_scheduler()
    assert isinstance(scheduler, scheduler_class) and scheduler_shift(scheduler) == defaults.shift


@pytest.mark.parametrize("task", list(TASKS))
def test_registry_defaults_are_the_originals(task):
    """Every default is the original `generate_video.py`'s, or a documented difference whose original value
    `--reproduce-original` keeps."""
    defaults = TASKS[task].defaults
    fidelity = (ROOT / "docs" / "fidelity.md").read_text()
    for name, value in ORIGINAL[task].items():
        if name == "max_frames":  # 200 s at 25 fps
            assert defaults.max_audio_seconds * defaults.fps == value
        elif (task, name) in DOCUMENTED_DIFFERENCES:
            assert getattr(defaults, name) == DOCUMENTED_DIFFERENCES[task, name]
            assert getattr(defaults, f"original_{name}") == value
            assert f"default {name}" in fidelity, f"docs/fidelity.md gives no reason for the {task} {name}"
        else:
            assert getattr(defaults, name) == value, (task, name)


def test_flags_default_to_the_tasks_default_and_help_shows_each():
    """`--steps` etc. parse to None (the task's default, filled in by the request); --help lists every task's."""
    args = build_parser().parse_args(["generate", "--task", "talking_avatar"])
    assert (args.steps, args.duration, args.guidance_scale, args.max_audio_seconds) == (None, None, None, None)
    subparsers = build_parser()._subparsers._group_actions[0]
    text = " ".join(subparsers.choices["generate"].format_help().split())
    for name, spec in TASKS.items():
        assert f"{name} {spec.defaults.steps}" in text
        assert f"{name} {spec.defaults.resolution}" in text
    assert "talking_avatar 4" in text and "reference_to_video 5" in text  # steps, duration


def test_talking_avatar_without_steps_runs_four(tmp_path):
    """The bug: `skyreels-v3 generate --task talking_avatar` without --steps ran 8 steps per clip."""
    from skyreels_diffusers.app.cli import generation_request
    from skyreels_diffusers.app.request import with_task_defaults

    args = build_parser().parse_args(["generate", "--task", "talking_avatar", "--model", "tiny"])
    assert with_task_defaults(generation_request(args)).steps == 4
    args = build_parser().parse_args(["generate", "--task", "talking_avatar", "--model", "tiny", "--steps", "2"])
    assert with_task_defaults(generation_request(args)).steps == 2
