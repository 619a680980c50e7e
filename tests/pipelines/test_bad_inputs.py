"""Bad input raises ValueError naming the argument, before any model work."""

from __future__ import annotations

import pytest
import torch

from skyreels_diffusers.app.tiny import tiny_pipeline
from tests.helpers import random_image, random_video


def poisoned(task):
    """A tiny pipeline whose models fail loudly if anything runs them."""
    pipe = tiny_pipeline(task)

    def boom(*args, **kwargs):
        raise AssertionError("model work happened before input validation")

    for name in ("text_encoder", "transformer", "vae"):
        getattr(pipe, name).forward = boom
    pipe.vae.encode = boom
    return pipe


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"ref_images": []}, "ref_images"),
        ({"ref_images": [random_image()] * 5}, "ref_images"),
        ({"ref_images": ["/nonexistent/x.png"]}, "ref_images"),
        ({"prompt": "  "}, "prompt"),
        ({"num_frames": 10}, "num_frames"),
        ({"resolution": "1080P", "height": None, "width": None}, "resolution"),
        ({"height": 30}, "height"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"output_type": "gif"}, "output_type"),
        ({"guidance_scale": 0.5}, "guidance_scale"),
    ],
)
def test_reference_bad_inputs(kwargs, argument):
    args = dict(ref_images=[random_image()], prompt="a cat", num_frames=5, height=32, width=48)
    with pytest.raises(ValueError, match=argument):
        poisoned("reference_to_video")(**{**args, **kwargs})


def test_non_image_file_is_rejected(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(ValueError, match=r"ref_images\[0\].*not a readable image"):
        poisoned("reference_to_video")(ref_images=[bad], prompt="x", num_frames=5, height=32, width=48)


@pytest.mark.parametrize(
    "task, kwargs, argument",
    [
        ("single_shot_extension", {"video": random_video(frames=24)}, "video"),
        ("single_shot_extension", {"duration": 0}, "duration"),
        ("single_shot_extension", {"duration": 2.5}, "duration"),
        ("single_shot_extension", {"resolution": "4K", "height": None, "width": None}, "resolution"),
        ("single_shot_extension", {"video": "/nonexistent.mp4"}, "video"),
        ("single_shot_extension", {"prompt": ""}, "prompt"),
        ("single_shot_extension", {"resize_mode": "lanczos"}, "resize_mode"),
        ("shot_switching_extension", {"duration": 6}, "duration"),
        ("shot_switching_extension", {"duration": 5, "video": random_video(frames=32)}, "video"),
    ],
)
def test_extension_bad_inputs(task, kwargs, argument):
    args = dict(video=random_video(frames=30), prompt="go", duration=2, height=32, width=48)
    with pytest.raises(ValueError, match=argument):
        poisoned(task)(**{**args, **kwargs})


def test_unreadable_video_file(tmp_path):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="video.*not a readable video"):
        poisoned("single_shot_extension")(video=bad, prompt="go", duration=1, height=32, width=48)


def test_poisoned_pipeline_really_fails_on_model_work():
    with pytest.raises(AssertionError, match="model work"):
        poisoned("reference_to_video")(
            ref_images=[random_image()],
            prompt="x",
            num_frames=5,
            height=32,
            width=48,
            generator=torch.Generator().manual_seed(0),
        )
