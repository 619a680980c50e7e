"""A video whose frame size changes (two clips joined) decodes: every frame scaled to the last frame's size, the
one a continuation starts from, with a warning naming the sizes (before: numpy's "all input arrays must have the
same shape" / "could not broadcast input array", shown as if it were about the flag)."""

from __future__ import annotations

import logging

import numpy as np
import PIL.Image
import pytest

from skyreels_diffusers.pipelines.video_io import load_video, load_video_tail


def _ts(path, width: int, height: int, frames: int, value: int) -> bytes:
    """An H.264 MPEG-TS clip of flat grey frames (TS files may be joined byte by byte, as `cat` does)."""
    import av

    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), value, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


@pytest.fixture(scope="module")
def joined(tmp_path_factory):
    """20 frames of 64 x 48 grey 60, then 30 frames of 96 x 64 grey 200."""
    folder = tmp_path_factory.mktemp("joined")
    path = folder / "joined.ts"
    path.write_bytes(_ts(folder / "a.ts", 64, 48, 20, 60) + _ts(folder / "b.ts", 96, 64, 30, 200))
    return path


SIZE_WARNING = "the frame size changes within the video (64 x 48, 96 x 64); every frame is scaled to the last frame's"


@pytest.mark.parametrize("tail", [None, 33])
def test_a_frame_size_change_is_scaled_to_the_last_frame(joined, tail, caplog):
    with caplog.at_level(logging.WARNING):
        frames, fps = load_video(joined, name="input_video") if tail is None else load_video_tail(joined, tail)
    assert frames.dtype == np.uint8 and frames.shape == (50 if tail is None else 33, 64, 96, 3)
    assert fps == 24.0
    first_part = 20 if tail is None else 3
    assert np.abs(frames[:first_part].astype(int) - 60).max() <= 3
    assert np.abs(frames[first_part:].astype(int) - 200).max() <= 3
    assert SIZE_WARNING in caplog.text


def test_a_tail_inside_one_size_needs_no_scaling(joined, caplog):
    with caplog.at_level(logging.WARNING):
        frames, _ = load_video_tail(joined, 25)
    assert frames.shape == (25, 64, 96, 3) and np.abs(frames.astype(int) - 200).max() <= 3
    assert "frame size" not in caplog.text


def test_pil_frames_of_different_sizes_and_modes():
    frames = [PIL.Image.new("L", (32, 16), 10), PIL.Image.new("RGBA", (48, 32), (200, 0, 0, 255))]
    video, fps = load_video(frames, name="video")
    assert video.shape == (2, 32, 48, 3) and fps is None
    assert (video[0] == 10).all() and (video[1] == (200, 0, 0)).all()
