"""`skyreels-v3 generate` end to end with --model tiny: playable mp4s, flag spellings, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from skyreels_diffusers.app.cli import build_parser, main
from skyreels_diffusers.app.tiny import tiny_pipeline
from skyreels_diffusers.pipelines.video_io import write_video
from tests.helpers import random_image, random_video


def probe(path: Path) -> tuple[int, int, int, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        return frames, stream.height, stream.width, float(stream.average_rate)


@pytest.fixture
def media(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    random_image(60, 40, seed=1).save(a)
    random_image(40, 60, seed=2).save(b)
    video = write_video(random_video(frames=30, height=64, width=96), tmp_path / "in.mp4", fps=24)
    return {"a": str(a), "b": str(b), "video": str(video)}


def test_reference_to_video_writes_playable_mp4(media, tmp_path, capsys):
    out = tmp_path / "r2v.mp4"
    code = main(
        [
            "generate",
            "--task",
            "reference_to_video",
            "--model",
            "tiny",
            "--ref-imgs",
            media["a"],
            media["b"],
            "--prompt",
            "a girl and a dog",
            "--duration",
            "1",
            "--height",
            "32",
            "--width",
            "48",
            "--steps",
            "2",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)  # the written path is printed last
    assert probe(out) == (25, 32, 48, 24.0)


@pytest.mark.slow
def test_tiny_default_size_is_small(media, tmp_path):
    out = tmp_path / "small.mp4"
    assert (
        main(
            [
                "generate",
                "--task",
                "reference_to_video",
                "--model",
                "tiny",
                "--ref-imgs",
                media["b"],
                "--duration",
                "1",
                "--steps",
                "1",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    frames, height, width, fps = probe(out)
    assert max(height, width) <= 256 and height % 16 == 0 and width % 16 == 0 and frames == 25


@pytest.mark.parametrize(
    "task, duration, frames", [("single_shot_extension", 1, 36), ("shot_switching_extension", 2, 49)]
)
def test_extension_tasks_write_mp4(media, tmp_path, task, duration, frames):
    out = tmp_path / f"{task}.mp4"
    code = main(
        [
            "generate",
            "--task",
            task,
            "--model",
            "tiny",
            "--input-video",
            media["video"],
            "--duration",
            str(duration),
            "--steps",
            "1",
            "--height",
            "32",
            "--width",
            "48",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    assert probe(out) == (frames, 32, 48, 24.0)


def test_snake_case_and_comma_separated_spellings():
    args = build_parser().parse_args(
        [
            "generate",
            "--task_type",
            "reference_to_video",
            "--model_id",
            "tiny",
            "--ref_imgs",
            "a.png,b.png",
            "--input_video",
            "v.mp4",
        ]
    )
    assert (args.task, args.model, args.ref_imgs, args.input_video) == (
        "reference_to_video",
        "tiny",
        ["a.png,b.png"],
        "v.mp4",
    )


@pytest.mark.parametrize(
    "extra, argument",
    [
        (["--ref-imgs"], None),  # argparse: needs at least one
        (["--ref-imgs", "{a},{a},{a},{b},{b}"], "--ref-imgs"),
        (["--ref-imgs", "{notimage}"], "--ref-imgs"),
        (["--ref-imgs", "{a}", "--prompt", " "], "--prompt"),
        (["--ref-imgs", "{a}", "--duration", "0"], "--duration"),
        (["--ref-imgs", "{a}", "--height", "100", "--width", "48"], "--height"),
        (["--ref-imgs", "{a}", "--parallel-backend", "xfuser"], "--parallel-backend"),  # needs degree > 1
        # xfuser is not installed here (it cannot import without a GPU): the message says how to install it
        (["--ref-imgs", "{a}", "--parallel-backend", "xfuser", "--ulysses-degree", "2"], "pip install xfuser"),
    ],
)
def test_bad_reference_input_fails_before_loading(media, tmp_path, capsys, monkeypatch, extra, argument):
    import skyreels_diffusers.app.run as run_module

    monkeypatch.setattr(run_module, "load_pipeline", lambda request: pytest.fail("model loaded before validation"))
    notimage = tmp_path / "x.png"
    notimage.write_text("text")
    extra = [e.format(a=media["a"], b=media["b"], notimage=notimage) for e in extra]
    out = tmp_path / "never.mp4"
    argv = ["generate", "--task", "reference_to_video", "--model", "tiny", "--output", str(out), *extra]
    if argument is None:
        with pytest.raises(SystemExit):
            main(argv)
    else:
        assert main(argv) == 2
        assert argument in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".never*"))


@pytest.mark.parametrize(
    "task, extra, argument",
    [
        ("single_shot_extension", ["--input-video", "{short}"], "--input-video"),
        ("shot_switching_extension", ["--input-video", "{video}", "--duration", "7"], "--duration"),
        ("single_shot_extension", ["--input-video", "{video}", "--resolution", "1080P"], None),
    ],
)
def test_bad_extension_input(media, tmp_path, capsys, monkeypatch, task, extra, argument):
    import skyreels_diffusers.app.run as run_module

    monkeypatch.setattr(run_module, "load_pipeline", lambda request: pytest.fail("model loaded before validation"))
    short = write_video(random_video(frames=10), tmp_path / "short.mp4", fps=24)
    extra = [e.format(video=media["video"], short=short) for e in extra]
    argv = ["generate", "--task", task, "--model", "tiny", "--output", str(tmp_path / "o.mp4"), *extra]
    if argument is None:
        with pytest.raises(SystemExit):  # argparse choices
            main(argv)
    else:
        assert main(argv) == 2
        assert argument in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_model_folder_missing_a_component(media, tmp_path, capsys):
    folder = tmp_path / "model"
    tiny_pipeline("reference_to_video").save_pretrained(folder)
    import shutil

    shutil.rmtree(folder / "vae")
    code = main(
        [
            "generate",
            "--task",
            "reference_to_video",
            "--model",
            str(folder),
            "--ref-imgs",
            media["a"],
            "--output",
            str(tmp_path / "o.mp4"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--model" in err and "'vae'" in err
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.slow
def test_converted_folder_runs_through_the_cli(media, tmp_path):
    folder = tmp_path / "model"
    tiny_pipeline("shot_switching_extension").save_pretrained(folder)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "SkyReelsV3ShotSwitchingPipeline"
    out = tmp_path / "o.mp4"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "skyreels_diffusers.app.cli",
            "generate",
            "--task",
            "shot_switching_extension",
            "--model",
            str(folder),
            "--input-video",
            media["video"],
            "--duration",
            "2",
            "--steps",
            "1",
            "--height",
            "32",
            "--width",
            "48",
            "--output",
            str(out),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert probe(out)[0] == 49


@pytest.mark.slow
@pytest.mark.parametrize("task, frames", [("reference_to_video", 25), ("shot_switching_extension", 49)])
def test_tiny_without_inputs_uses_builtin_examples(tmp_path, task, frames):
    out = tmp_path / "o.mp4"
    duration = "1" if task == "reference_to_video" else "2"
    assert (
        main(
            [
                "generate",
                "--task",
                task,
                "--model",
                "tiny",
                "--duration",
                duration,
                "--steps",
                "1",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    n, height, width, fps = probe(out)
    assert n == frames and max(height, width) <= 256 and fps == 24.0


@pytest.mark.parametrize(
    "task, argument", [("reference_to_video", "--ref-imgs"), ("single_shot_extension", "--input-video")]
)
def test_real_model_without_inputs_is_an_error(tmp_path, capsys, task, argument):
    folder = tmp_path / "model"
    tiny_pipeline(task).save_pretrained(folder)
    assert main(["generate", "--task", task, "--model", str(folder), "--output", str(tmp_path / "o.mp4")]) == 2
    assert argument in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def write_wav(path: Path, seconds: float, rate: int = 22050) -> Path:
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(
        path, (0.3 * np.sin(2 * np.pi * 200 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32), rate
    )
    return path


@pytest.mark.slow
def test_talking_avatar_mp4_carries_audio_of_matching_length(tmp_path, capsys):
    face = tmp_path / "face.png"
    random_image(64, 48, seed=3).save(face)
    speech = write_wav(tmp_path / "speech.wav", 3.5)
    out = tmp_path / "avatar.mp4"
    code = main(
        [
            "generate",
            "--task",
            "talking_avatar",
            "--model",
            "tiny",
            "--input-image",
            str(face),
            "--input-audio",
            str(speech),
            "--height",
            "32",
            "--width",
            "48",
            "--output",
            str(out),
        ]
    )
    assert code == 0 and capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    with av.open(str(out)) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        frames = sum(1 for _ in container.decode(video))
        assert (frames, float(video.average_rate), audio.codec_context.name) == (88, 25.0, "aac")
        video_seconds = frames / 25
        audio_seconds = float(audio.duration * audio.time_base)
    assert abs(video_seconds - audio_seconds) <= 1 / 25
    assert audio.rate == 22050  # the user's original audio, not the 16-kHz normalised copy


@pytest.mark.parametrize(
    "extra, argument",
    [
        (["--input-audio", "{speech}"], "--input-image"),
        (["--input-image", "{face}"], "--input-audio"),
        (["--input-image", "{face}", "--input-audio", "{short}"], "--input-audio"),
        (["--input-image", "{face}", "--input-audio", "{speech}", "--max-audio-seconds", "1"], "--input-audio"),
        (["--input-image", "{speech}", "--input-audio", "{speech}"], "--input-image"),
    ],
)
def test_talking_avatar_bad_input(tmp_path, capsys, monkeypatch, extra, argument):
    import skyreels_diffusers.app.run as run_module

    monkeypatch.setattr(run_module, "load_pipeline", lambda request: pytest.fail("model loaded before validation"))
    face = tmp_path / "face.png"
    random_image(64, 48).save(face)
    paths = {"face": face, "speech": write_wav(tmp_path / "s.wav", 2.0), "short": write_wav(tmp_path / "t.wav", 0.2)}
    argv = [
        "generate",
        "--task",
        "talking_avatar",
        "--model",
        "tiny",
        "--output",
        str(tmp_path / "o.mp4"),
        *[e.format(**paths) for e in extra],
    ]
    assert main(argv) == 2
    assert argument in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()
