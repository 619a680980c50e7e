"""Speech input of the talking avatar: decoding, loudness normalisation, wav2vec2 features and per-frame windows."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils import logging


SAMPLE_RATE = 16000
VIDEO_FPS = 25  # wav2vec2 features are resampled to the avatar's 25 fps
MIN_SECONDS = 0.4
#: the longest speech any call accepts (`max_audio_seconds` may lower the limit, never raise it past this)
MAX_SECONDS = 200.0
DEFAULT_MAX_SECONDS = MAX_SECONDS
TARGET_LUFS = -23.0
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".m4a", ".aac", ".ogg")

logger = logging.get_logger(__name__)


@dataclass
class SpeechAudio:
    """A decoded speech clip: the 16-kHz mono waveform the features come from, the loudness-normalised one, and the
    source waveform (all channels, native rate) for muxing into the output."""

    waveform: np.ndarray  # float32 [samples] at 16 kHz, mono
    normalized: np.ndarray  # float32 [samples] at 16 kHz, -23 LUFS
    source: np.ndarray  # float32 [samples] or [samples, channels] at `source_rate`
    source_rate: int

    @property
    def duration(self) -> float:
        return len(self.waveform) / SAMPLE_RATE

    @property
    def num_frames(self) -> int:
        """Video frames at 25 fps: ceil(duration * 25)."""
        return math.ceil(len(self.waveform) * VIDEO_FPS / SAMPLE_RATE)


def probe_audio_seconds(path: str | os.PathLike) -> float | None:
    """Duration of an audio file from its header, without decoding: soundfile's info for wav/flac/ogg, else the
    PyAV container's or stream's duration; None when the file does not state it."""
    path = Path(path)
    if path.suffix.lower() in (".wav", ".flac", ".ogg"):
        try:
            import soundfile

            info = soundfile.info(str(path))
            if info.samplerate > 0 and info.frames > 0:
                return info.frames / info.samplerate
        except (ImportError, RuntimeError):  # soundfile does not know this file: ask PyAV
            pass
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            if container.duration:
                return container.duration / 1_000_000
    except av.error.FFmpegError:
        return None  # the decoder reports what is wrong
    return None


def pcm_to_float(array: np.ndarray) -> np.ndarray:
    """Decoded samples -> float32 in [-1, 1): unsigned 8-bit is centred on 128, signed integers are divided by
    2^(bits-1) (24-bit PCM arrives left-aligned in 32 bits), floats pass unchanged."""
    if array.dtype == np.uint8:
        return (array.astype(np.float32) - 128.0) / 128.0
    if array.dtype.kind == "i":
        return (array.astype(np.float64) / -float(np.iinfo(array.dtype).min)).astype(np.float32)
    return array.astype(np.float32)


#: undecodable packets skipped after the first decoded frame (the tag block of a second mp3 joined to the first
#: is one); more mean a damaged file, which is refused
MAX_SKIPPED_PACKETS = 8


def _decode(path: Path, name: str, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """All channels, float32 `[samples, channels]`, and their rate (PyAV: wav, mp3, flac, m4a/aac, ogg).

    Each decoded frame carries its own sample rate and channel layout: a stream whose rate or layout changes (two
    mp3 files joined) is decoded as runs of equal frames, each resampled to the highest rate and spread to the most
    channels (`join_segments`), so every second of audio stays one second. A few undecodable packets after the first
    frame (a joined file's tag block) are skipped with a warning. With `max_seconds`, decoding stops as soon as the
    limit is passed (for files whose header states no duration)."""
    import av

    segments: list[tuple[int, list[np.ndarray]]] = []
    seconds, skipped = 0.0, []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise ValueError(f"`{name}`: {path} has no audio stream.")
            stream = container.streams.audio[0]
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    if not segments or len(skipped) >= MAX_SKIPPED_PACKETS:
                        raise
                    skipped.append(seconds)
                    continue
                for frame in frames:
                    array = frame.to_ndarray()
                    array = array.T if frame.format.is_planar else array.reshape(-1, len(frame.layout.channels))
                    rate = int(frame.sample_rate or stream.rate)
                    if not segments or segments[-1][0] != rate or segments[-1][1][0].shape[1] != array.shape[1]:
                        segments.append((rate, []))
                    segments[-1][1].append(pcm_to_float(array))
                    seconds += len(array) / rate
                    if max_seconds is not None and seconds > max_seconds:
                        raise ValueError(_too_long(name, seconds, max_seconds, at_least=True))
    except av.error.FFmpegError as error:
        raise ValueError(f"`{name}`: {path} is not a readable audio file ({error}).") from None
    if not segments:
        raise ValueError(f"`{name}`: {path} has no decodable audio.")
    if skipped:
        logger.warning(
            f"`{name}`: skipped {len(skipped)} undecodable packet(s) of {path.name} (at "
            f"{', '.join(f'{t:.2f}' for t in skipped)} s; a joined file's tag block, or damage)."
        )
    return join_segments([(rate, np.concatenate(chunks)) for rate, chunks in segments])


def join_segments(segments: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, int]:
    """Runs of audio `(rate, [samples, channels])` -> one `[samples, channels]` array at the highest rate: each run
    is resampled on its own (soxr HQ) and given the largest channel count (mono repeated; other counts averaged
    to mono first, as no layout maps onto another)."""
    rate = max(r for r, _ in segments)
    channels = max(a.shape[1] for _, a in segments)
    if len(segments) == 1:
        return segments[0][1], rate
    import soxr

    joined = []
    for run_rate, samples in segments:
        if samples.shape[1] != channels:
            mono = samples if samples.shape[1] == 1 else samples.mean(axis=1, keepdims=True)
            samples = np.repeat(mono, channels, axis=1)
        if run_rate != rate:
            samples = soxr.resample(np.ascontiguousarray(samples), run_rate, rate, quality="HQ")
        joined.append(np.asarray(samples, dtype=np.float32).reshape(-1, channels))
    return np.concatenate(joined), rate


def to_mono_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Average channels and resample to 16 kHz with soxr's high-quality filter (librosa's default)."""
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate != SAMPLE_RATE:
        import soxr

        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return mono


def loudness_normalize(waveform: np.ndarray, rate: int = SAMPLE_RATE, target: float = TARGET_LUFS) -> np.ndarray:
    """Integrated-loudness normalisation to `target` LUFS with pyloudnorm (ITU-R BS.1770); unchanged when the
    measured loudness is not finite or beyond +-100 LUFS (digital silence), like the original."""
    import pyloudnorm

    meter = pyloudnorm.Meter(rate)
    loudness = meter.integrated_loudness(waveform)
    if not np.isfinite(loudness) or abs(loudness) > 100:
        return waveform.astype(np.float32)
    return pyloudnorm.normalize.loudness(waveform, loudness, target).astype(np.float32)


def load_speech(
    audio: str | os.PathLike | np.ndarray,
    sample_rate: int | None = None,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    name: str = "audio",
) -> SpeechAudio:
    """Decode, check and normalise a speech input (path, or a waveform with its `sample_rate`).

    Raises `ValueError` naming `name` for unreadable files, audio under 0.4 s or over `max_seconds`, and silence.
    """
    if isinstance(audio, (str, os.PathLike)):
        path = Path(audio)
        if not path.is_file():
            raise ValueError(f"`{name}`: file not found: {path}")
        seconds = probe_audio_seconds(path)
        if seconds is not None and seconds > max_seconds:
            raise ValueError(_too_long(name, seconds, max_seconds))
        source, rate = _decode(path, name, max_seconds=max_seconds)
    else:
        if sample_rate is None:
            raise ValueError(f"`{name}`: a waveform needs its `sample_rate`.")
        source, rate = np.asarray(audio, dtype=np.float32), int(sample_rate)
        if source.ndim not in (1, 2) or source.size == 0:
            raise ValueError(f"`{name}`: waveform must be [samples] or [samples, channels], got {source.shape}.")
    if not np.isfinite(source).all():
        raise ValueError(f"`{name}`: the audio holds NaN or infinite samples.")
    waveform = to_mono_16k(source, rate)
    duration = len(waveform) / SAMPLE_RATE
    if duration < MIN_SECONDS:
        raise ValueError(f"`{name}`: {duration:.2f} s of audio; at least {MIN_SECONDS} s are needed.")
    if duration > max_seconds:
        raise ValueError(_too_long(name, duration, max_seconds))
    if np.abs(waveform).max() < 1e-4:
        raise ValueError(f"`{name}`: the audio is silent.")
    return SpeechAudio(waveform, loudness_normalize(waveform), source, rate)


def _too_long(name: str, seconds: float, max_seconds: float, at_least: bool = False) -> str:
    """The over-the-limit message; its hint is one the user can follow (no raising the limit past `MAX_SECONDS`)."""
    if max_seconds < MAX_SECONDS:
        hint = f"raise `max_audio_seconds` to allow up to {MAX_SECONDS:g} s"
    else:
        hint = f"{MAX_SECONDS:g} s is the longest audio accepted; split the speech into parts of at most that"
    return (
        f"`{name}`: {'more than ' if at_least else ''}{seconds:.1f} s of audio is over the limit of "
        f"{max_seconds:g} s ({hint})."
    )


@torch.no_grad()
def wav2vec2_features(audio_encoder, feature_extractor, waveform: np.ndarray, num_frames: int) -> torch.Tensor:
    """The original's wav2vec2 front end: normalise the waveform, run the CNN feature encoder, interpolate its
    ~50 Hz features linearly (align_corners) to `num_frames` video frames, then feature projection and the
    transformer encoder; returns the outputs of all encoder layers, `[num_frames, layers, hidden]` float32."""
    inputs = feature_extractor(waveform, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_values
    param = next(audio_encoder.parameters())
    inputs = inputs.to(param.device, param.dtype)
    features = audio_encoder.feature_extractor(inputs)  # [1, C, T_cnn]
    features = F.interpolate(features, size=num_frames, mode="linear", align_corners=True).transpose(1, 2)
    hidden_states, _ = audio_encoder.feature_projection(features)
    layer_outputs = []

    def keep(module, args, output):
        layer_outputs.append(output[0] if isinstance(output, tuple) else output)

    hooks = [layer.register_forward_hook(keep) for layer in audio_encoder.encoder.layers]
    try:
        audio_encoder.encoder(hidden_states)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(layer_outputs, dim=2)[0].float()  # [T, layers, hidden]


def audio_windows(features: torch.Tensor, start: int, length: int, window: int = 5) -> torch.Tensor:
    """For video frames `start .. start+length-1`, the `window` audio frames centred on each (clamped to the
    available frames): `[T, layers, dim]` -> `[length, window, layers, dim]`."""
    half = window // 2
    centre = torch.arange(start, start + length, device=features.device)
    index = (centre[:, None] + torch.arange(-half, half + 1, device=features.device)[None]).clamp(0, len(features) - 1)
    return features[index]
