"""Audio whose sample rate or channel layout changes mid-stream (two mp3 files joined) decodes at its true length
and pitch; the over-the-limit message only hints at what the user can do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from skyreels_diffusers.pipelines import audio_io
from skyreels_diffusers.pipelines.audio_io import MAX_SECONDS, join_segments, load_speech


SECONDS = 2.05  # each part; the "4.1-s speech" is two of them
TONE = 220.0


def _mp3(path: Path, rate: int, channels: int, tags: bool) -> bytes:
    """A 2.05-s 220-Hz tone as mp3 (libmp3lame); `tags=False` writes neither an ID3 tag nor a Xing frame."""
    import av

    samples = int(SECONDS * rate)
    tone = (0.3 * np.sin(2 * np.pi * TONE * np.arange(samples) / rate)).astype(np.float32)
    planar = np.ascontiguousarray(np.repeat(tone[None], channels, axis=0))
    options = {} if tags else {"id3v2_version": "0", "write_xing": "0"}
    with av.open(str(path), "w", format="mp3", options=options) as container:
        stream = container.add_stream("libmp3lame", rate=rate)
        stream.layout = "mono" if channels == 1 else "stereo"
        size = stream.codec_context.frame_size or 1152
        for start in range(0, samples, size):
            frame = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(planar[:, start : start + size]), format="fltp", layout=stream.layout.name
            )
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


def _joined(tmp_path: Path, second_channels: int, tags: bool) -> Path:
    """22.05-kHz mono + 44.1-kHz mono or stereo, the bytes of one file after the other (`cat a.mp3 b.mp3`)."""
    first = _mp3(tmp_path / "a.mp3", 22050, 1, tags)
    second = _mp3(tmp_path / "b.mp3", 44100, second_channels, tags)
    path = tmp_path / "joined.mp3"
    path.write_bytes(first + second)
    return path


def _pitch(waveform: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.fft.rfftfreq(len(waveform), 1 / rate)[spectrum.argmax()])


def test_a_rate_change_mid_stream_keeps_length_and_pitch(tmp_path):
    """Before: decoded at the first part's rate: 6.30 s instead of 4.1 (the video as long), the second part an
    octave low in the muxed audio."""
    speech = load_speech(_joined(tmp_path, 1, tags=False))
    assert abs(speech.duration - 2 * SECONDS) < 0.15, speech.duration  # mp3 padding: a few frames per file
    assert speech.source_rate == 44100 and speech.source.shape[1] == 1
    second = speech.source[-int(1.5 * 44100) :, 0]
    first = speech.source[: int(1.5 * 44100), 0]
    assert abs(_pitch(first, 44100) - TONE) < 3 and abs(_pitch(second, 44100) - TONE) < 3
    assert abs(_pitch(speech.waveform[-24000:], audio_io.SAMPLE_RATE) - TONE) < 3


def test_mono_joined_to_stereo_with_tags_decodes(tmp_path, caplog):
    """Before: `ValueError: all the input array dimensions except for the concatenation axis must match exactly
    ...` (numpy's text, shown as if it were about the flag); with the second file's ID3 tag in the middle PyAV's
    `Invalid data found when processing input` refused the whole file."""
    speech = load_speech(_joined(tmp_path, 2, tags=True))
    assert speech.source.shape[1] == 2 and speech.source_rate == 44100
    assert abs(speech.duration - 2 * SECONDS) < 0.15, speech.duration
    left, right = speech.source[:44100].T  # the mono part is spread to both channels
    np.testing.assert_array_equal(left, right)
    assert abs(_pitch(speech.source[-44100:, 1], 44100) - TONE) < 3


def test_damage_past_a_few_packets_is_still_refused(tmp_path, monkeypatch):
    path = _joined(tmp_path, 2, tags=True)
    monkeypatch.setattr(audio_io, "MAX_SKIPPED_PACKETS", 0)
    with pytest.raises(ValueError, match=r"`audio`: .*joined\.mp3 is not a readable audio file \(.*Invalid data"):
        load_speech(path)


def test_join_segments_resamples_each_run_and_spreads_channels():
    mono_16k = np.ones((16000, 1), np.float32) * 0.5
    stereo_32k = np.stack([np.full(16000, 0.25), np.full(16000, -0.25)], axis=1).astype(np.float32)
    joined, rate = join_segments([(16000, mono_16k), (32000, stereo_32k)])
    assert rate == 32000 and joined.shape == (48000, 2) and joined.dtype == np.float32
    np.testing.assert_allclose(joined[2000:30000], 0.5, atol=2e-3)  # away from the resampler's edges
    np.testing.assert_allclose(joined[34000:46000], [[0.25, -0.25]] * 12000, atol=1e-6)
    single, single_rate = join_segments([(8000, mono_16k)])
    assert single is mono_16k and single_rate == 8000


@pytest.mark.parametrize(
    "limit, hint",
    [
        (10.0, "(raise `max_audio_seconds` to allow up to 200 s)."),
        (MAX_SECONDS, "(200 s is the longest audio accepted; split the speech into parts of at most that)."),
    ],
)
def test_the_long_audio_hint_is_one_the_user_can_follow(tmp_path, limit, hint):
    """Before: `(raise `max_audio_seconds` to allow longer audio)` also at the limit's maximum, 200 s, which no
    value of `max_audio_seconds` can pass."""
    from tests.reliability.fault_cases import _wav

    path = _wav(tmp_path / "long.wav", 250.0, rate=8000)
    with pytest.raises(ValueError) as error:
        load_speech(path, max_seconds=limit)
    assert str(error.value) == f"`audio`: 250.0 s of audio is over the limit of {limit:g} s {hint}"
