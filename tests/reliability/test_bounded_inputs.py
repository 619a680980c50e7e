"""Inputs are checked and decoded only as far as they are used: video tails, over-long audio, image bombs/shapes."""

from __future__ import annotations

import tracemalloc
from fractions import Fraction

import numpy as np
import PIL.Image
import pytest

from skyreels_diffusers.pipelines import video_io
from skyreels_diffusers.pipelines.video_io import load_image, load_video, load_video_tail


FRAMES, HEIGHT, WIDTH = 240, 96, 128


def _clip(path, frames=FRAMES, gop=12):
    """An H.264 clip whose every frame differs (a moving bar and the frame index as a grey level)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(24))
        stream.height, stream.width, stream.pix_fmt = HEIGHT, WIDTH, "yuv420p"
        stream.options = {"g": str(gop), "crf": "18"}
        for i in range(frames):
            array = np.full((HEIGHT, WIDTH, 3), i % 256, np.uint8)
            array[:, (i * 3) % WIDTH : (i * 3) % WIDTH + 8] = 255 - (i % 256)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return _clip(tmp_path_factory.mktemp("clip") / "clip.mp4")


@pytest.mark.parametrize("num_frames", [1, 25, 33, FRAMES, FRAMES + 10])
def test_tail_equals_the_end_of_a_full_decode(clip, num_frames):
    full, fps = load_video(clip)
    tail, tail_fps = load_video_tail(clip, num_frames)
    assert len(full) == FRAMES and tail_fps == fps == 24
    np.testing.assert_array_equal(tail, full[-num_frames:])


def test_tail_falls_back_to_a_streaming_decode_when_the_seek_is_not_usable(clip, monkeypatch):
    full, _ = load_video(clip)
    monkeypatch.setattr(video_io, "_seek_tail", lambda *args: False)
    tail, _ = load_video_tail(clip, 33)
    np.testing.assert_array_equal(tail, full[-33:])


def test_tail_holds_only_the_frames_it_returns(clip, monkeypatch):
    converted = []
    original = video_io._frame_array
    monkeypatch.setattr(video_io, "_frame_array", lambda frame, rot: converted.append(1) or original(frame, rot))
    frame_bytes = HEIGHT * WIDTH * 3

    tracemalloc.start()
    load_video(clip)
    full_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    converted.clear()
    tracemalloc.start()
    tail, _ = load_video_tail(clip, 25)
    tail_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert full_peak > FRAMES * frame_bytes  # the measurement sees decoded frames
    assert len(converted) == 25 == len(tail)  # only the kept frames become RGB arrays
    assert tail_peak < 3 * 25 * frame_bytes + (1 << 20), (tail_peak, full_peak)


def test_tail_of_a_short_video_and_bad_arguments(tmp_path):
    short = _clip(tmp_path / "short.mp4", frames=10)
    assert len(load_video_tail(short, 33)[0]) == 10
    with pytest.raises(ValueError, match="num_frames"):
        load_video_tail(short, 0)
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 100)
    with pytest.raises(ValueError, match="`input_video`: .* is not a readable video"):
        load_video_tail(tmp_path / "junk.mp4", 5, name="input_video")


# ------------------------------------------------------------------------------------------------------ audio
def _wav(path, seconds, rate=16000):
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate)
    return path


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".mp3"])
def test_over_long_audio_is_refused_before_decoding(tmp_path, monkeypatch, suffix):
    from skyreels_diffusers.pipelines import audio_io

    wav = _wav(tmp_path / "long.wav", 12.0)
    path = wav
    if suffix != ".wav":
        import av

        path = tmp_path / f"long{suffix}"
        samples, rate = audio_io._decode(wav, "x")
        with av.open(str(path), "w") as container:
            codec = {".flac": "flac", ".mp3": "libmp3lame"}[suffix]
            stream = container.add_stream(codec, rate=rate)
            stream.layout = "mono"
            fmt = "s16" if codec == "flac" else "fltp"
            data = (samples.T * 32767).astype(np.int16) if fmt == "s16" else samples.T.astype(np.float32)
            size = 1152
            for start in range(0, data.shape[1], size):
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(data[:, start : start + size]), format=fmt, layout="mono"
                )
                frame.sample_rate, frame.pts = rate, start
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    seconds = audio_io.probe_audio_seconds(path)
    assert seconds == pytest.approx(12.0, abs=0.2)

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded before the length check")

    monkeypatch.setattr(audio_io, "_decode", no_decode)
    with pytest.raises(
        ValueError, match=r"`input_audio`: 12\.\d s of audio is over the limit of 5 s .*max_audio_seconds"
    ):
        audio_io.load_speech(path, max_seconds=5, name="input_audio")


def test_decode_stops_at_the_limit_when_the_metadata_is_missing(tmp_path, monkeypatch):
    from skyreels_diffusers.pipelines import audio_io

    path = _wav(tmp_path / "long.wav", 12.0)
    monkeypatch.setattr(audio_io, "probe_audio_seconds", lambda path: None)
    chunks = []
    original = audio_io.pcm_to_float
    monkeypatch.setattr(audio_io, "pcm_to_float", lambda array: chunks.append(len(array)) or original(array))
    with pytest.raises(ValueError, match=r"`input_audio`: more than 5\.\d s of audio is over the limit of 5 s"):
        audio_io.load_speech(path, max_seconds=5, name="input_audio")
    assert 5 * 16000 < sum(chunks) < 6 * 16000  # decoding stopped just past the limit, not at 12 s


# ------------------------------------------------------------------------------------------------------ images
def test_decompression_bomb_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    PIL.Image.new("L", (400, 400)).save(path)  # compresses to a few hundred bytes
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 50_000)  # 160_000 pixels: over twice the limit -> error
    with pytest.raises(ValueError, match="`ref_imgs`: .* more pixels than the limit of 50000"):
        load_image(path, name="ref_imgs")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100_000)  # between one and two times: PIL only warns
    with pytest.raises(ValueError, match="`ref_imgs`: .* more pixels than the limit of 100000"):
        load_image(path, name="ref_imgs")


@pytest.mark.parametrize("size", [(1, 4000), (4000, 1), (90, 10)])
def test_images_no_bucket_can_use_are_refused(tmp_path, size):
    path = tmp_path / "thin.png"
    PIL.Image.new("RGB", size, (10, 20, 30)).save(path)
    with pytest.raises(ValueError, match=r"`input_image`: a \d+ x \d+ image has an aspect ratio beyond 1:8"):
        load_image(path, name="input_image")
    assert load_image(PIL.Image.new("RGB", (80, 10))).size == (80, 10)  # 1:8 is still accepted


def test_tail_seeks_instead_of_decoding_the_whole_clip(clip, monkeypatch):
    decoded = []
    original = video_io._decode_ring

    def counting(container, stream, num_frames):
        frames = list(container.decode(stream))
        decoded.append(len(frames))
        return frames[-num_frames:] if num_frames else frames

    monkeypatch.setattr(video_io, "_decode_ring", counting)
    tail, _ = load_video_tail(clip, 25)
    assert len(tail) == 25 and decoded and sum(decoded) < FRAMES // 2, decoded
    monkeypatch.setattr(video_io, "_decode_ring", original)


@pytest.mark.parametrize("return_input_video", [False, True])
def test_the_pipeline_given_a_path_decodes_only_the_tail_it_uses(clip, monkeypatch, return_input_video):
    """The pipeline API (not only the request layer) reads a video file's tail: before, `load_input_video` decoded
    every frame of the file; with `return_input_video` the whole clip is needed and read."""
    import torch

    from skyreels_diffusers.app.tiny import tiny_pipeline
    from skyreels_diffusers.pipelines.pipeline_skyreels_v3_shot_switching import SHOT_NUM_CONDITION_FRAMES_MAP

    converted = []
    original = video_io._frame_array
    monkeypatch.setattr(video_io, "_frame_array", lambda frame, rot: converted.append(1) or original(frame, rot))
    pipe = tiny_pipeline("shot_switching_extension")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        video=str(clip),
        prompt="x",
        duration=2,
        height=32,
        width=48,
        num_inference_steps=1,
        return_input_video=return_input_video,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames
    generated = 2 * 24 + 1
    assert len(converted) == (FRAMES if return_input_video else SHOT_NUM_CONDITION_FRAMES_MAP[2])
    assert out.shape[:2] == (1, generated + (FRAMES if return_input_video else 0))
