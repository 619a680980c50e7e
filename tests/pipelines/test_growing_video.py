"""The growing mp4 of long runs: playable while it is written (video and audio up to the written point), the normal mp4
at the end, the same bytes however the windows arrive (what lets a resumed run continue the same output), errors
raised in the caller's thread; and the command line's talking avatar, watchable while it runs and resumable into the
same output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from skyreels_diffusers.pipelines.video_io import (
    GrowingVideoWriter,
    partial_path,
    write_video,
)
from tests.helpers import random_image


RATE, FPS = 16000, 25
SIZES = (69, 64, 64, 76)  # the kept frames of a 4-window avatar run


def moving_windows(sizes=SIZES, height=32, width=48) -> list[np.ndarray]:
    """Frames of a gradient moving to the right (encodes like video, not like noise), split into windows."""
    y, x = np.mgrid[0:height, 0:width]
    frames = [
        np.stack([(x * 5 + t * 3) % 256, (y * 7 + t) % 256, np.full_like(x, (t * 11) % 256)], -1).astype(np.uint8)
        for t in range(sum(sizes))
    ]
    bounds = np.cumsum((0, *sizes))
    return [np.stack(frames[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def tone(seconds: float) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * RATE)) / RATE)).astype(np.float32)


def probe(path: Path) -> tuple[int, float]:
    """(decodable video frames, decodable audio seconds) of an mp4, with PyAV."""
    with av.open(str(path)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return frames, 0.0
        seconds = sum(frame.samples / frame.sample_rate for frame in container.decode(audio=0))
    return frames, seconds


def decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_grows_window_by_window_with_audio_and_ends_as_a_normal_mp4(tmp_path):
    windows, audio = moving_windows(), tone(sum(SIZES) / FPS)
    out = tmp_path / "out.mp4"
    writer = GrowingVideoWriter(partial_path(out), FPS, audio=audio, audio_sample_rate=RATE, crf=0)
    assert writer.path == tmp_path / "out.partial.mp4" and not writer.path.exists()  # created by the first window
    written, seen = 0, []
    for frames in windows:
        writer.append(frames)
        writer.wait()
        video_frames, audio_seconds = probe(writer.path)  # a valid file while it grows
        # every earlier window whole (its last fragment ended with this window's keyframe), most of this one
        assert written < video_frames <= written + len(frames) and video_frames >= written + len(frames) - FPS
        assert audio_seconds >= video_frames / FPS - 0.1  # the audio up to the written point
        written += len(frames)
        seen.append(video_frames)
    assert seen == sorted(set(seen))  # it grew at every window
    assert writer.finish(out) == out and not writer.path.exists()
    head = out.read_bytes()
    assert b"moof" not in head and head.index(b"moov") < head.index(b"mdat")  # not fragmented, index first
    whole = write_video(np.concatenate(windows), tmp_path / "whole.mp4", fps=FPS, crf=0)
    np.testing.assert_array_equal(decoded(out), decoded(whole))  # lossless both: the same frames as one encode
    assert probe(out)[0] == sum(SIZES) and abs(probe(out)[1] - len(audio) / RATE) < 0.07


def test_the_same_windows_give_the_same_video_whenever_they_arrive(tmp_path):
    """A resumed run re-appends its saved windows at once and the rest one by one as they are generated: its video
    must be the one an uninterrupted run writes (every window has its own encoder, the audio is one stream; compared
    losslessly: x264 through PyAV does not give the same bytes from run to run here, even for one encode)."""
    windows, audio = moving_windows(), tone(11.0)
    paths = []
    for name, wait in (("a", False), ("b", True)):
        with GrowingVideoWriter(tmp_path / f"{name}.partial.mp4", FPS, audio, RATE, crf=0) as writer:
            for frames in windows:
                writer.append(frames.astype(np.float32) / 255 if wait else frames)  # floats in [0, 1] too
                if wait:
                    writer.wait()
        paths.append(writer.finish(tmp_path / f"{name}.mp4"))
    np.testing.assert_array_equal(decoded(paths[0]), decoded(paths[1]))
    with av.open(str(paths[0])) as a, av.open(str(paths[1])) as b:
        audio_a = [bytes(p) for p in a.demux(audio=0) if p.size]
        assert audio_a == [bytes(p) for p in b.demux(audio=0) if p.size]  # the AAC stream is the same bytes


def test_errors_reach_the_caller_and_keep_what_was_written(tmp_path):
    writer = GrowingVideoWriter(tmp_path / "x.partial.mp4", FPS)
    with pytest.raises(ValueError, match="no frames were appended"):
        writer.finish(tmp_path / "x.mp4")
    windows = moving_windows((10, 10))
    writer = GrowingVideoWriter(tmp_path / "y.partial.mp4", FPS)
    writer.append(windows[0])
    with pytest.raises(ValueError, match=r"one size for the whole video, got \(10, 16, 48, 3\)"):
        writer.append(windows[1][:, :16])
    (tmp_path / "y.mp4").write_bytes(b"taken")
    with pytest.raises(FileExistsError):
        writer.finish(tmp_path / "y.mp4", overwrite=False)
    assert (tmp_path / "y.mp4").read_bytes() == b"taken" and probe(writer.path)[0] == 10  # kept, playable
    blocked = tmp_path / "a_file"
    blocked.write_text("x")
    broken = GrowingVideoWriter(blocked / "z.partial.mp4", FPS, queue_size=1)
    for frames in moving_windows((5, 5, 5)):  # the thread failed on the first: the others never block
        broken.append(frames) if broken._error is None else None
    with pytest.raises(OSError):
        broken.close()


# ---------------------------------------------------------------------------------------------- the command line
def _wav(path: Path, seconds: float) -> Path:
    import soundfile

    t = np.arange(int(seconds * 22050)) / 22050
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 200 * t) * (1 + np.sin(2 * np.pi * 3 * t))), 22050)
    return path


def _request(tmp_path: Path, output: Path, **extra):
    from skyreels_diffusers.app.request import GenerationRequest

    face = tmp_path / "face.png"
    if not face.exists():
        random_image(48, 40).save(face)
        _wav(tmp_path / "speech.wav", 10.0)  # 250 frames: the keyframe clip and 4 windows
    return GenerationRequest(
        task="talking_avatar",
        model="tiny",
        input_image=str(face),
        input_audio=str(tmp_path / "speech.wav"),
        steps=1,
        height=32,
        width=32,
        device="cpu",
        output=str(output),
        **extra,
    )


def ffprobe(path: Path) -> dict:
    """ffprobe's reading of an mp4: {codec type: (packets, seconds)}."""
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-count_packets", "-show_entries", "stream=codec_type,nb_read_packets,duration"]
        + ["-of", "json", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    streams = json.loads(done.stdout)["streams"]
    return {s["codec_type"]: (int(s["nb_read_packets"]), float(s.get("duration", 0))) for s in streams}


def wait_for(condition, seconds: float = 60.0):
    """Poll `condition()` until it returns something true (the writer encodes on its own thread), bounded."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, "the growing file did not grow"
        time.sleep(0.05)
    return value


@pytest.mark.slow
def test_a_long_avatar_run_plays_while_it_runs(tmp_path):
    """After its first window and before its end, the command line's mp4 of a 4-window run is a valid, growing file
    with audio, read by ffprobe (and PyAV); at the end it is the normal mp4 at --output."""
    from skyreels_diffusers.app.run import run

    have_ffprobe = shutil.which("ffprobe") is not None
    if not have_ffprobe and os.environ.get("CI"):
        pytest.fail("ffprobe is missing in CI: .ci/run installs ffmpeg")
    out = tmp_path / "avatar.mp4"
    growing, probes = partial_path(out), []

    def on_window(pipe, index, total):
        assert total == 5 and not out.exists()
        if index < 2:  # the keyframe clip (no frames yet), then window 0 queued for the writer
            return
        # window `index - 1` is queued: once it is encoded, window `index - 2` and every earlier one are in the file
        expected = 69 + 64 * (index - 2)
        frames, seconds = wait_for(lambda: (f := probe(growing))[0] >= expected and f)
        assert seconds >= frames / FPS - 0.1  # the audio up to the written point
        probes.append((frames, ffprobe(growing) if have_ffprobe else None))

    assert run(_request(tmp_path, out), callback_on_window_end=on_window) == out
    assert [i for i, _ in enumerate(probes)] == [0, 1, 2] and probes[0][0] >= FPS  # a second, then more
    assert [f for f, _ in probes] == sorted({f for f, _ in probes})
    assert not growing.exists() and probe(out)[0] == 250 and abs(probe(out)[1] - 10.0) < 0.1
    if not have_ffprobe:
        pytest.skip("ffprobe is not installed (apt-get install ffmpeg; CI installs it): read with PyAV only")
    for frames, streams in probes:
        assert set(streams) == {"video", "audio"} and streams["video"][0] >= frames  # ffprobe reads all of it
        assert streams["audio"][1] >= streams["video"][1] - 0.1
    assert ffprobe(out)["video"][0] == 250


@pytest.mark.slow
def test_resume_dir_continues_the_same_output(tmp_path):
    """A run killed after two windows leaves its growing mp4 (playable); the same command again rebuilds it from the
    resume folder, goes on, and ends with the video of an uninterrupted run (the same frames, losslessly encoded)."""
    from skyreels_diffusers.app.run import run

    class Killed(Exception):
        pass

    def kill_after_window_1(pipe, index, total):
        if index == 2:
            raise Killed

    whole = run(_request(tmp_path, tmp_path / "whole.mp4", crf=0))
    resumed = tmp_path / "resumed.mp4"
    request = _request(tmp_path, resumed, resume_dir=str(tmp_path / "resume"), crf=0)
    with pytest.raises(Killed):
        run(request, callback_on_window_end=kill_after_window_1)
    assert not resumed.exists() and probe(partial_path(resumed))[0] >= 69  # closed on the way out: playable
    windows_made = []
    assert run(request, callback_on_window_end=lambda pipe, i, n: windows_made.append(i)) == resumed
    assert windows_made == [3, 4] and not partial_path(resumed).exists()
    np.testing.assert_array_equal(decoded(resumed), decoded(whole))  # lossless: the same frames
    assert probe(resumed)[1] == probe(whole)[1]


def test_a_failed_final_write_keeps_the_growing_video_and_says_where(tmp_path, monkeypatch):
    from skyreels_diffusers.app.output import finish_or_keep
    from skyreels_diffusers.pipelines import video_io

    writer = GrowingVideoWriter(tmp_path / "run.partial.mp4", FPS)
    writer.append(moving_windows((8,))[0])

    def disk_full(source, target):
        Path(target).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(video_io, "remux_mp4", disk_full)
    with pytest.raises(ValueError, match=r"^--output: writing .*run\.mp4 failed \(No space left on device\)") as error:
        finish_or_keep(writer, tmp_path / "run.mp4")
    assert f"the video is kept in {writer.path} (a playable mp4" in str(error.value)
    assert probe(writer.path)[0] == 8 and sorted(p.name for p in tmp_path.iterdir()) == ["run.partial.mp4"]


def test_ctrl_c_during_a_growing_run_says_where_the_video_is(monkeypatch, capsys, tmp_path):
    from skyreels_diffusers.app.cli import main

    def interrupted(request):
        raise KeyboardInterrupt(f"the video so far is in {tmp_path / 'x.partial.mp4'}")

    monkeypatch.setattr("skyreels_diffusers.app.cli.run", interrupted)
    for extra, tail in (([], "x.partial.mp4."), (["--resume-dir", str(tmp_path / "r")], "resume from --resume-dir.")):
        assert main(["generate", "--task", "talking_avatar", "--model", "tiny", *extra]) == 130
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("interrupted: the video so far is in ") and line.endswith(tail), line


@pytest.mark.parametrize("truncate", [False, True])
def test_tensor_frames_become_the_same_uint8_as_numpy_frames(truncate):
    """`to_uint8` converts a tensor on its own device (a quarter of the bytes cross to the host); the levels are the
    NumPy path's, half-level ties (rounded to even) and out-of-range values included."""
    from skyreels_diffusers.pipelines.video_io import to_uint8

    generator = torch.Generator().manual_seed(0)
    ties = torch.arange(511, dtype=torch.float32) / 2 / 255  # every k / 2 level
    frames = torch.cat([torch.rand(4096, generator=generator) * 1.2 - 0.1, ties, torch.tensor([-0.0, 1.0, 1e-9])])
    scaled = frames.numpy() * np.float32(255.0)
    expected = np.clip(scaled if truncate else np.rint(scaled), 0, 255).astype(np.uint8)
    ours = to_uint8(frames, truncate=truncate)
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(to_uint8(frames.numpy(), truncate=truncate), expected)
