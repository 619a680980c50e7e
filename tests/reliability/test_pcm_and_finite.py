"""PCM WAV decoding against a reference decode written from the raw bytes, and the NaN/inf latent check."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from skyreels_diffusers.pipelines.audio_io import _decode
from skyreels_diffusers.pipelines.common import FiniteWatch


RATE = 8000
# (bits, WAVE format tag: 1 = integer PCM, 3 = IEEE float, numpy dtype of one sample in the file)
FORMATS = {
    "u8": (8, 1, "u1"),
    "s16": (16, 1, "<i2"),
    "s24": (24, 1, None),
    "s32": (32, 1, "<i4"),
    "f32": (32, 3, "<f4"),
    "f64": (64, 3, "<f8"),
}


def _signal(samples: int, channels: int) -> np.ndarray:
    """[samples, channels] in [-0.99, 0.99]: a different tone per channel, plus the extremes."""
    t = np.arange(samples)[:, None] / RATE
    signal = 0.9 * np.sin(2 * np.pi * (220 + 110 * np.arange(channels))[None] * t)
    signal[:3] = [[-1.0], [0.0], [0.999]]
    return signal


def _wav_bytes(signal: np.ndarray, fmt: str) -> bytes:
    """A canonical RIFF/WAVE file, written by hand (WAVE_FORMAT_EXTENSIBLE above two channels, like every tool)."""
    bits, tag, dtype = FORMATS[fmt]
    if fmt == "u8":
        data = np.clip(np.round(signal * 128 + 128), 0, 255).astype("u1").tobytes()
    elif tag == 3:
        data = signal.astype(dtype).tobytes()
    else:
        ints = np.clip(np.round(signal * 2 ** (bits - 1)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).astype(np.int64)
        if bits == 24:
            data = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints.reshape(-1))
        else:
            data = ints.astype(dtype).tobytes()
    channels = signal.shape[1]
    block = channels * bits // 8
    if channels > 2:
        mask = (1 << channels) - 1
        guid = struct.pack("<H", tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt_chunk = struct.pack("<HHIIHHHHI", 0xFFFE, channels, RATE, RATE * block, block, bits, 22, bits, mask) + guid
    else:
        fmt_chunk = struct.pack("<HHIIHH", tag, channels, RATE, RATE * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt_chunk)) + fmt_chunk + b"data" + struct.pack("<I", len(data))
    return b"RIFF" + struct.pack("<I", len(body) + len(data)) + body + data


def _reference_decode(raw: bytes) -> np.ndarray:
    """Independent decode of the bytes above: find `fmt `/`data`, scale as the WAVE spec says."""
    pos, fmt, data = 12, None, None
    while pos < len(raw):
        cid, size = raw[pos : pos + 4], struct.unpack("<I", raw[pos + 4 : pos + 8])[0]
        if cid == b"fmt ":
            fmt = raw[pos + 8 : pos + 8 + size]
        elif cid == b"data":
            data = raw[pos + 8 : pos + 8 + size]
        pos += 8 + size
    tag, channels, _, _, _, bits = struct.unpack("<HHIIHH", fmt[:16])
    if tag == 0xFFFE:
        tag = struct.unpack("<H", fmt[24:26])[0]
    if tag == 3:
        values = np.frombuffer(data, dtype="<f4" if bits == 32 else "<f8").astype(np.float64)
    elif bits == 8:
        values = (np.frombuffer(data, dtype="u1").astype(np.float64) - 128) / 128
    else:
        width = bits // 8
        as_bytes = np.frombuffer(data, dtype="u1").reshape(-1, width)
        ints = np.zeros(len(as_bytes), dtype=np.int64)
        for i in range(width):
            ints |= as_bytes[:, i].astype(np.int64) << (8 * i)
        ints -= (ints >= 2 ** (bits - 1)) * 2**bits
        values = ints / 2 ** (bits - 1)
    return values.reshape(-1, channels)


@pytest.mark.parametrize("channels", [1, 2, 6])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_pcm_wav_format_decodes_like_the_reference(tmp_path, fmt, channels):
    raw = _wav_bytes(_signal(4000, channels), fmt)
    path = tmp_path / f"{fmt}_{channels}.wav"
    path.write_bytes(raw)
    reference = _reference_decode(raw)
    samples, rate = _decode(path, "input_audio")
    assert rate == RATE and samples.dtype == np.float32 and samples.shape == reference.shape
    np.testing.assert_allclose(samples, reference, rtol=0, atol=1e-6)
    assert abs(samples.mean()) < 0.01  # no DC offset (unsigned 8-bit was left at +1 before)


def test_finite_watch_remembers_the_first_bad_step():
    watch = FiniteWatch()
    for step in range(3):
        latents = torch.randn(1, 16, 3, 4, 4)
        if step >= 1:
            latents[0, 0, 0, 0, 0] = float("nan") if step == 1 else float("inf")
        watch.update(latents, step)
    with pytest.raises(FloatingPointError, match="from denoising step 2 on"):
        watch.check()
    clean = FiniteWatch()
    clean.update(torch.zeros(2), 0)
    clean.check()  # finite: no error


@pytest.mark.parametrize("task", ["reference_to_video", "shot_switching_extension"])
def test_a_diverged_run_stops_before_decoding(task):
    """NaN latents (here injected by a callback at step 2) end the run with an error naming the step; the VAE never
    decodes them."""
    from skyreels_diffusers.app.tiny import tiny_pipeline
    from tests.helpers import random_image, random_video

    pipe = tiny_pipeline(task)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.decode = lambda *a, **k: pytest.fail("diverged latents were decoded")

    def poison(pipeline, step, timestep, tensors):
        return {"latents": tensors["latents"] * float("nan")} if step == 1 else {}

    inputs = (
        {"ref_images": [random_image()], "num_frames": 5}
        if task == "reference_to_video"
        else {"video": random_video(), "duration": 2}
    )
    with pytest.raises(FloatingPointError, match="denoising step 2"):
        pipe(
            prompt="x",
            height=32,
            width=48,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=poison,
            **inputs,
        )
