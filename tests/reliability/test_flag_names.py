"""Every error of the command line names the flag the user typed (`--resume-dir`, `--width`), never the pipeline's
argument (`` `resume_dir` ``)."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from skyreels_diffusers.app.cli import main
from tests.helpers import random_image


def _wav(path, seconds=1.0, rate=16000):
    t = np.arange(int(seconds * rate)) / rate
    data = np.round(0.3 * np.sin(2 * np.pi * 220 * t) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def _generate(argv, capsys):
    code = main(["generate", *argv])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    return code, err


@pytest.fixture
def avatar(tmp_path):
    image = tmp_path / "face.png"
    random_image(48, 40).save(image)
    audio = _wav(tmp_path / "speech.wav", seconds=4.0)  # more than one 81-frame clip: a window file
    return [
        "--task", "talking_avatar", "--model", "tiny", "--input-image", str(image), "--input-audio", str(audio),
        "--steps", "1", "--height", "32", "--width", "32", "--device", "cpu",
    ]  # fmt: skip


def test_resume_errors_name_the_flag(tmp_path, avatar, capsys):
    """Before: `` error: `resume_dir`: ... `` for each (the pipeline's argument name, not the flag)."""
    resume_file = tmp_path / "resume_file"
    resume_file.write_text("x")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "state.pt").write_bytes(b"PK\x03\x04 junk" * 30)
    for folder, why in ((resume_file, "is a file"), (garbage, "not a resume state")):
        code, err = _generate([*avatar, "--resume-dir", str(folder), "--output", str(tmp_path / "x.mp4")], capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --resume-dir: {folder} "), err
        assert why in err[0] and "`resume_dir`" not in err[0]
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.slow
def test_resume_errors_found_during_the_run_name_the_flag(tmp_path, avatar, capsys):
    """A finished run's folder reused with another seed (a different run), and with a window file deleted."""
    resume = tmp_path / "resume"
    code, _ = _generate([*avatar, "--resume-dir", str(resume), "--output", str(tmp_path / "a.mp4")], capsys)
    assert code == 0 and (resume / "window_00000.npy").is_file()

    argv = [*avatar, "--resume-dir", str(resume), "--output", str(tmp_path / "b.mp4")]
    code, err = _generate([*argv, "--seed", "5"], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --resume-dir: {resume} holds a different run")

    (resume / "window_00000.npy").unlink()
    code, err = _generate(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --resume-dir: {resume} lacks the finished window file(s) window_00000.npy")
    assert not (tmp_path / "b.mp4").exists()


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--height", "32", "--width", "33"], "error: --width: must be a multiple of 16"),
        (["--height", "33", "--width", "32"], "error: --height: must be a multiple of 16"),
        (["--height", "32"], "error: --width: must be given with the other side"),
        (["--width", "32"], "error: --height: must be given with the other side"),
        (["--steps", "0"], "error: --steps: "),
        (["--duration", "0"], "error: --duration: "),
        # before: "--duration: must be 4k+1 up to 721 (...), got 2400001." (frames, for a flag in seconds)
        (["--duration", "100000"], "error: --duration: must be at most 30 seconds for reference_to_video"),
        (["--duration", "31"], "error: --duration: must be at most 30 seconds"),
    ],
)
def test_size_and_step_errors_name_their_own_flag(tmp_path, capsys, flags, expected):
    code, err = _generate(
        ["--task", "reference_to_video", "--model", "tiny", *flags, "--output", str(tmp_path / "o.mp4")], capsys
    )
    assert code == 2 and len(err) == 1 and err[0].startswith(expected), err


def test_hints_inside_a_message_name_flags_too(tmp_path, avatar, capsys):
    """Before: `... over the limit of 1 s (raise `max_audio_seconds` to allow longer audio).`"""
    code, err = _generate([*avatar, "--max-audio-seconds", "1", "--output", str(tmp_path / "x.mp4")], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0] == (
        "error: --input-audio: 4.0 s of audio is over the limit of 1 s (raise --max-audio-seconds to allow up to "
        "200 s)."
    )


def test_a_full_or_read_only_resume_disk_is_refused_before_loading(tmp_path, avatar, capsys, monkeypatch):
    """Before: the run loaded the model, made the first clip and then failed with a PyTorch-internal traceback,
    leaving a partial state file."""
    import shutil
    from collections import namedtuple

    from skyreels_diffusers.app import run as run_module

    monkeypatch.setattr(run_module, "load_pipeline", lambda request: pytest.fail("the model loaded first"))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    resume = tmp_path / "resume"
    code, err = _generate([*avatar, "--resume-dir", str(resume), "--output", str(tmp_path / "x.mp4")], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(
        f"error: --resume-dir: {resume} is on a disk with 1000 bytes free; the run's resume files"
    )
    assert not resume.exists() and not (tmp_path / "x.mp4").exists()
