"""The web app shows the avatar's video while it grows: a second player on the avatar tab, fed with the running job's
growing mp4 whenever it grew."""

from __future__ import annotations

import dataclasses
import time

import pytest


pytest.importorskip("gradio", reason="the web app extra (gradio) is not installed")

from skyreels_diffusers.app.web import JobRunner, build_app, build_request
from tests.app.test_app_jobs import _speech, _upload_image, form, uploads  # noqa: F401 (the fixture)


def test_only_the_tab_made_window_by_window_has_the_live_player(tmp_path):
    demo = build_app(model="tiny", output_dir=str(tmp_path), runner=JobRunner())
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert "talking_avatar-live" in ids
    assert not {f"{task}-live" for task in ("reference_to_video", "single_shot_extension")} & ids
    assert any(type(block).__name__ == "Timer" for block in demo.blocks.values())


@pytest.mark.slow
def test_the_running_avatar_job_shows_its_growing_video(tmp_path, uploads):  # noqa: F811
    runner = JobRunner()
    image = _upload_image(uploads)
    audio = _speech(uploads / "3f2a9c" / "speech.wav", seconds=6.0)  # the keyframe clip and 3 windows
    seen = []

    def progress(fraction, desc=""):
        if desc.startswith("window 2/"):  # window 0 is in the writer: its frames reach the file
            deadline = time.monotonic() + 60
            while (path := runner.live_video("S")) is None:
                assert time.monotonic() < deadline, "no growing video shown"
                time.sleep(0.05)
            seen.append(path)
            assert runner.live_video("S") is None  # not again until it grows
            assert runner.live_video("other session") is None

    request = build_request("talking_avatar", form(input_image=str(image), input_audio=str(audio)), "tiny", tmp_path)
    request = dataclasses.replace(request, steps=1, height=32, width=32)  # the form's path, at a small size
    path = str(runner(request, progress=progress, job="S"))
    assert len(seen) == 1 and seen[0] == path.removesuffix(".mp4") + ".partial.mp4"  # the job result's growing file
    assert runner.live_video("S") is None and runner._live == {}  # nothing once the job is done
