"""The web app's job logic without a browser: cancel per session (running or queued), cancel stops before the
decode (the avatar's first window too), messages without server paths, upload copies deleted, long prompts cut."""

from __future__ import annotations

import shlex
import threading
from pathlib import Path

import numpy as np
import pytest


pytest.importorskip("gradio", reason="the web app extra (gradio) is not installed")

from skyreels_diffusers.app.web import (
    MAX_SHOWN_PROMPT,
    Cancelled,
    JobRunner,
    build_request,
    cli_command,
    scrub_paths,
    submit_job,
)
from tests.helpers import random_image


def form(**overrides):
    return {"prompt": "a cat", "resolution": "default", "duration": 1, "seed": 7, "steps": 2, **overrides}


@pytest.fixture
def uploads(tmp_path, monkeypatch):
    """Gradio's upload folder, moved under tmp_path."""
    folder = tmp_path / "gradio"
    folder.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folder))
    return folder


def _upload_image(uploads: Path, name="portrait.png") -> Path:
    path = uploads / "3f2a9c" / name
    path.parent.mkdir()
    random_image(40, 40).save(path)
    return path


def _speech(path: Path, seconds=1.0) -> Path:
    import soundfile

    t = np.arange(int(16000 * seconds)) / 16000
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(6 * t))).astype(np.float32), 16000)
    return path


@pytest.mark.slow
def test_cancel_is_per_session(tmp_path):
    """Before: one global flag: B's Cancel stopped A's job and B's own queued job still ran."""
    image = tmp_path / "a.png"
    random_image().save(image)
    runner = JobRunner()
    request_a = build_request("reference_to_video", form(ref_imgs=[str(image)]), "tiny", tmp_path)
    request_b = build_request("reference_to_video", form(ref_imgs=[str(image)]), "tiny", tmp_path)
    outcome_b, started = {}, []

    def run_b():
        try:
            outcome_b["path"] = runner(request_b, job="B")
        except Cancelled:
            outcome_b["cancelled"] = True

    thread_b = threading.Thread(target=run_b)

    def progress_a(fraction, desc=""):
        if not started:
            started.append(desc)
            thread_b.start()  # B presses Generate while A runs: queued behind A
            while "B" not in runner._cancels:
                threading.Event().wait(0.01)
            assert runner.cancel("B")  # B cancels its own queued job
            assert not runner.cancel("C")  # a session without a job cancels nothing

    path_a = runner(request_a, progress=progress_a, job="A")
    thread_b.join(timeout=300)
    assert Path(path_a).is_file()  # A was not stopped by B's cancel
    assert outcome_b == {"cancelled": True} and not Path(request_b.output).exists()  # B never ran
    assert runner._cancels == {}


@pytest.mark.slow
def test_cancel_in_the_avatars_first_window_stops_before_decoding(tmp_path, uploads):
    """Before: 'need at least one array to concatenate' after the keyframe clip had been decoded."""
    runner = JobRunner()
    image = _upload_image(uploads)
    audio = _speech(uploads / "3f2a9c" / "speech.wav", seconds=3.5)  # more than one window
    decoded = []

    def progress(fraction, desc=""):
        runner.cancel("S")  # Cancel during the first step of the first clip

    request_form = form(input_image=str(image), input_audio=str(audio), steps=2)
    pipe = runner.pipeline(build_request("talking_avatar", request_form, "tiny", tmp_path))
    original = pipe.decode_latents
    pipe.decode_latents = lambda latents: decoded.append(1) or original(latents)
    path, _shown, messages = submit_job(runner, "talking_avatar", request_form, "tiny", tmp_path, "S", progress)
    assert (path, messages) == (None, {"general": "Cancelled."})
    assert decoded == []  # nothing decoded after the cancel
    assert not image.exists() and not audio.exists() and not (uploads / "3f2a9c").exists()  # uploads cleaned


def test_errors_do_not_show_server_paths_and_uploads_are_deleted(tmp_path, uploads):
    broken = uploads / "9e1d0b" / "broken.png"
    broken.parent.mkdir()
    broken.write_bytes(b"not an image")
    mine = tmp_path / "kept.png"  # a path given on the server side, outside the upload folder: never deleted
    random_image().save(mine)
    path, _shown, messages = submit_job(
        JobRunner(), "reference_to_video", form(ref_imgs=[str(broken), str(mine)]), "tiny", tmp_path / "out", "S"
    )
    assert path is None and list(messages) == ["ref_imgs"]
    assert "broken.png" in messages["ref_imgs"] and str(uploads) not in messages["ref_imgs"]
    assert "/tmp" not in messages["ref_imgs"] and str(tmp_path) not in messages["ref_imgs"], messages
    assert not broken.exists() and not broken.parent.exists() and mine.is_file()


def test_scrub_paths_keeps_file_names(uploads):
    import tempfile

    message = (
        f"`input_video`: {uploads}/ab12/clip.mp4 is not a readable video (Invalid data found when processing "
        f"input: '{tempfile.gettempdir()}/other/x.mp4')"
    )
    assert scrub_paths(message) == (
        "`input_video`: clip.mp4 is not a readable video (Invalid data found when processing input: 'x.mp4')"
    )


def test_a_huge_prompt_is_not_echoed_whole(tmp_path):
    prompt = "a cat " * 200_000  # 1.2 MB
    request = build_request("reference_to_video", form(prompt=prompt), "tiny", tmp_path)
    command = cli_command(request)
    assert len(command) < MAX_SHOWN_PROMPT + 1000
    first, note = command.split("\n")
    assert f"first {MAX_SHOWN_PROMPT} of {len(prompt)} characters" in note and note.startswith("#")
    assert shlex.split(first)[shlex.split(first).index("--prompt") + 1] == prompt[:MAX_SHOWN_PROMPT]
    short = cli_command(build_request("reference_to_video", form(), "tiny", tmp_path))
    assert "\n" not in short and "'a cat'" in short


def test_one_job_per_session_at_a_time(tmp_path):
    runner = JobRunner()
    runner._cancels["S"] = threading.Event()  # S has a job queued
    with pytest.raises(ValueError, match="already has a job"):
        runner(build_request("reference_to_video", form(), "tiny", tmp_path), job="S")


def test_gradio_hands_each_handler_the_visitors_session(tmp_path):
    """The Generate and Cancel handlers receive the session (gr.Request) from Gradio, so jobs are keyed per visitor."""
    from types import SimpleNamespace

    from gradio.helpers import special_args

    from skyreels_diffusers.app.web import build_app

    runner = JobRunner()
    demo = build_app(model="tiny", output_dir=str(tmp_path), runner=runner)
    visitor = SimpleNamespace(session_hash="visitor-1")
    handlers = {fn.api_name: fn.fn for fn in demo.fns.values()}
    generate = handlers["generate_reference_to_video"]
    values = ["ref-imgs", "prompt", "resolution", "duration", "seed", "steps"]  # the tab's six inputs
    inputs, _, _, _ = special_args(generate, inputs=list(values), request=visitor)
    assert inputs[0] is visitor and inputs[1:7] == values
    cancels = [fn for name, fn in handlers.items() if "cancel" in name]
    assert len(cancels) == 4
    runner._cancels["visitor-1"] = threading.Event()
    inputs, _, _, _ = special_args(cancels[0], inputs=[], request=visitor)
    cancels[0](*inputs)
    assert runner._cancels["visitor-1"].is_set()


@pytest.mark.slow
def test_the_equivalent_command_names_uploads_by_their_file_names(tmp_path, uploads):
    image = _upload_image(uploads, "face.png")
    path, shown, messages = submit_job(
        JobRunner(), "reference_to_video", form(ref_imgs=[str(image)], steps=1), "tiny", tmp_path / "out", "S"
    )
    assert messages == {} and Path(path).is_file()
    assert "--ref-imgs face.png" in shown and str(uploads) not in shown
    assert str(tmp_path / "out") in shown  # the output path is the server's real one (not a temporary copy)
