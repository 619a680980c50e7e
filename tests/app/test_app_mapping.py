"""The web app's request mapping: forms -> the CLI's request, the shown command, errors placed by field, cancel."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest


pytest.importorskip("gradio", reason="the web app extra (gradio) is not installed")

from skyreels_diffusers.app.cli import build_parser  # noqa: E402
from skyreels_diffusers.app.request import validate  # noqa: E402
from skyreels_diffusers.app.web import Cancelled, JobRunner, build_request, cli_command, error_field  # noqa: E402
from tests.helpers import random_image  # noqa: E402


def form(**overrides):
    return {"prompt": "a cat", "resolution": "default", "duration": 1, "seed": 7, "steps": 2, **overrides}


def test_form_becomes_the_cli_request_and_command(tmp_path):
    image = tmp_path / "a.png"
    random_image().save(image)
    request = build_request("reference_to_video", form(ref_imgs=[str(image)], resolution="480P"), "tiny", tmp_path)
    assert (request.task, request.model, request.prompt, request.duration, request.seed, request.steps) == (
        "reference_to_video",
        "tiny",
        "a cat",
        1,
        7,
        2,
    )
    assert request.resolution == "480P" and request.ref_imgs == [str(image)]
    assert Path(request.output).parent == tmp_path / "reference_to_video"
    other = build_request("reference_to_video", form(ref_imgs=[str(image)]), "tiny", tmp_path)
    assert other.output != request.output  # never overwritten
    args = build_parser().parse_args(shlex.split(cli_command(request))[1:])
    assert (
        args.task,
        args.model,
        args.prompt,
        args.duration,
        args.seed,
        args.steps,
        args.resolution,
        args.ref_imgs,
        args.output,
    ) == ("reference_to_video", "tiny", "a cat", 1, 7, 2, "480P", [str(image)], request.output)


@pytest.mark.parametrize(
    "task, fields, field",
    [
        ("reference_to_video", {"ref_imgs": ["x.png"] * 5}, "ref_imgs"),
        ("reference_to_video", {"ref_imgs": ["a.png"], "prompt": " "}, "prompt"),
        ("shot_switching_extension", {"input_video": "v.mp4", "duration": 9}, "duration"),
        ("talking_avatar", {"input_audio": "s.wav"}, "input_image"),
    ],
)
def test_validation_errors_name_the_input(tmp_path, task, fields, field):
    image = tmp_path / "a.png"
    random_image().save(image)
    fields = {k: ([str(image)] * len(v) if k == "ref_imgs" else v) for k, v in fields.items()}
    if task == "shot_switching_extension":
        from skyreels_diffusers.pipelines.video_io import write_video
        from tests.helpers import random_video

        fields["input_video"] = str(write_video(random_video(), tmp_path / "v.mp4", fps=24))
    if task == "talking_avatar":
        import numpy as np
        import soundfile

        soundfile.write(tmp_path / "s.wav", 0.3 * np.sin(np.arange(16000) / 10.0), 16000)
        fields["input_audio"] = str(tmp_path / "s.wav")
    request = build_request(task, form(**fields), "tiny", tmp_path)
    with pytest.raises(ValueError) as error:
        validate(request)
    assert error_field(error.value) == field


@pytest.mark.slow
def test_cancel_stops_between_steps_and_writes_nothing(tmp_path):
    image = tmp_path / "a.png"
    random_image().save(image)
    request = build_request("reference_to_video", form(ref_imgs=[str(image)], steps=3), "tiny", tmp_path)
    runner = JobRunner()
    seen = []

    def progress(fraction, desc=""):
        seen.append(desc)
        runner.cancel("default")  # the user presses Cancel during step 1

    with pytest.raises(Cancelled):
        runner(request, progress=progress)
    assert seen == ["step 1/3"]  # the later steps were skipped
    assert not Path(request.output).exists()
    path = runner(request)  # the next job runs normally (pipeline reused)
    assert Path(path).is_file() and len(runner.pipes) == 1
