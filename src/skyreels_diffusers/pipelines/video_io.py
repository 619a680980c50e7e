"""Image, video and mp4 input/output shared by the pipelines, the CLI and the app."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

ImageInput = str | os.PathLike | PIL.Image.Image
VideoInput = str | os.PathLike | np.ndarray | torch.Tensor | Sequence[PIL.Image.Image]


def load_image(image: ImageInput, name: str = "image", exif_transpose: bool = True) -> PIL.Image.Image:
    """Open an image as RGB, applying its EXIF orientation. Raises `ValueError` naming `name` when unreadable."""
    if isinstance(image, PIL.Image.Image):
        img = image
    else:
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"`{name}`: file not found: {path}")
        try:
            img = PIL.Image.open(path)
            img.load()
        except (PIL.UnidentifiedImageError, OSError) as error:
            raise ValueError(f"`{name}`: {path} is not a readable image ({error}).") from None
    if exif_transpose:
        img = PIL.ImageOps.exif_transpose(img)
    return img.convert("RGB")


def letterbox(image: PIL.Image.Image, width: int, height: int, fill=(255, 255, 255)) -> PIL.Image.Image:
    """Fit `image` inside (width, height) keeping its aspect (LANCZOS), centred on a `fill` canvas (the original's
    reference preprocessing: white bars, left/top padding = floor(delta / 2))."""
    aspect = image.width / image.height
    if aspect > width / height:
        new_w, new_h = width, int(width / aspect)
    else:
        new_w, new_h = int(height * aspect), height
    resized = image.resize((new_w, new_h), PIL.Image.LANCZOS)
    canvas = PIL.Image.new("RGB", (width, height), fill)
    canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))
    return canvas


def _frame_rotation(frame) -> int:
    rotation = getattr(frame, "rotation", 0) or 0
    return int(round(rotation / 90.0)) % 4


def load_video(video: VideoInput, name: str = "video", apply_rotation: bool = True) -> tuple[np.ndarray, float | None]:
    """Decode a video into uint8 RGB frames `[F, H, W, 3]` and its frame rate (None when not known).

    Accepts a path (decoded with PyAV; the display-matrix rotation is applied unless `apply_rotation=False`), a
    uint8 array `[F, H, W, 3]`, a float array/tensor in [0, 1] of that shape, or a list of PIL images.
    """
    if isinstance(video, (str, os.PathLike)):
        import av

        path = Path(video)
        if not path.is_file():
            raise ValueError(f"`{name}`: file not found: {path}")
        frames = []
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise ValueError(f"`{name}`: {path} has no video stream.")
                stream = container.streams.video[0]
                fps = float(stream.average_rate) if stream.average_rate else None
                for frame in container.decode(stream):
                    array = frame.to_ndarray(format="rgb24")
                    turns = _frame_rotation(frame) if apply_rotation else 0
                    frames.append(np.rot90(array, k=turns).copy() if turns else array)
        except av.error.FFmpegError as error:
            raise ValueError(f"`{name}`: {path} is not a readable video ({error}).") from None
        if not frames:
            raise ValueError(f"`{name}`: {path} has no decodable frames.")
        return np.stack(frames), fps
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"`{name}` array must be [F, H, W, 3], got {video.shape}.")
        if video.dtype != np.uint8:
            video = to_uint8(video)
        return video, None
    if isinstance(video, (list, tuple)) and video and all(isinstance(f, PIL.Image.Image) for f in video):
        return np.stack([np.asarray(f.convert("RGB")) for f in video]), None
    raise ValueError(f"`{name}` must be a path, a [F, H, W, 3] array or a list of PIL images, got {type(video)}.")


def to_uint8(frames, truncate: bool = False) -> np.ndarray:
    """Float frames in [0, 1] -> uint8 by rounding, or by truncation with `truncate=True` (the original's extension
    and avatar pipelines truncated, which darkens every frame by half a level on average and compounds across
    extension chunks)."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().float().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    scaled = frames * np.float32(255.0)
    return np.clip(scaled if truncate else np.rint(scaled), 0, 255).astype(np.uint8)


def pixels_to_uint8(pixels: torch.Tensor, truncate: bool = False) -> np.ndarray:
    """Pixels in [-1, 1], channels last -> uint8 (rounded, or truncated as the original's extension pipelines)."""
    return to_uint8((pixels / 2 + 0.5).clamp(0, 1), truncate=truncate)


def write_video(
    frames,
    path: str | os.PathLike,
    fps: float,
    audio: np.ndarray | None = None,
    audio_sample_rate: int | None = None,
    crf: int = 10,
) -> Path:
    """Write frames (`[F, H, W, 3]`, uint8 or float in [0, 1]) as H.264 mp4 (yuv420p, CRF 10 like the original),
    optionally with a mono/stereo float waveform muxed in as AAC. The file appears atomically: it is written next
    to `path` under a temporary name and renamed at the end, so a failure leaves no partial output."""
    import av

    frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty [F, H, W, 3] array, got {frames.shape}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4", dir=path.parent)
    os.close(fd)
    try:
        from fractions import Fraction

        rate = Fraction(fps).limit_denominator(1001)
        with av.open(tmp_name, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.height, stream.width = frames.shape[1], frames.shape[2]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            audio_stream = None
            if audio is not None:
                if audio_sample_rate is None:
                    raise ValueError("`audio_sample_rate` is required with `audio`.")
                audio = np.asarray(audio, dtype=np.float32)
                if audio.ndim == 2 and audio.shape[1] != 2:  # mono as [samples, 1], or more than two channels
                    audio = audio.mean(axis=1)
                audio_stream = container.add_stream("aac", rate=int(audio_sample_rate))
                audio_stream.layout = "mono" if audio.ndim == 1 else "stereo"
            for array in frames:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
            if audio_stream is not None:
                _mux_audio(container, audio_stream, np.asarray(audio, dtype=np.float32), int(audio_sample_rate))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def _mux_audio(container, stream, audio: np.ndarray, sample_rate: int) -> None:
    import av

    planar = audio[None, :] if audio.ndim == 1 else audio.T  # [channels, samples]
    frame_size = stream.codec_context.frame_size or 1024
    for start in range(0, planar.shape[1], frame_size):
        chunk = np.ascontiguousarray(planar[:, start : start + frame_size])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=stream.layout.name)
        frame.sample_rate = sample_rate
        frame.pts = start
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


RESIZE_MODES = ("nearest", "bilinear", "bicubic", "area")


def resize_frames(frames: np.ndarray, height: int, width: int, mode: str = "bilinear") -> torch.Tensor:
    """uint8 frames `[F, H0, W0, 3]` -> float pixels in [-1, 1] `[1, 3, F, height, width]`.

    `"nearest"` is the original's (a plain `F.interpolate`); the smooth modes filter with antialiasing, which avoids
    aliasing when the source is larger than the bucket.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}, got {mode!r}.")
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if pixels.shape[-2:] != (height, width):
        kwargs = {"antialias": True, "align_corners": False} if mode in ("bilinear", "bicubic") else {}
        pixels = torch.nn.functional.interpolate(pixels, size=(height, width), mode=mode, **kwargs)
        if mode == "bicubic":
            pixels = pixels.clamp(-1, 1)
    return pixels.permute(1, 0, 2, 3)[None]
