"""Image, video and mp4 input/output shared by the pipelines, the CLI and the app."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import signal
import threading
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers.utils import logging


logger = logging.get_logger(__name__)

ImageInput = str | os.PathLike | PIL.Image.Image
VideoInput = str | os.PathLike | np.ndarray | torch.Tensor | Sequence[PIL.Image.Image]


def load_image(
    image: ImageInput, name: str = "image", exif_transpose: bool = True, drop_alpha: bool = False
) -> PIL.Image.Image:
    """Open an image as RGB (`to_rgb`), applying its EXIF orientation. Raises `ValueError` naming `name` when
    unreadable."""
    if isinstance(image, PIL.Image.Image):
        img = image
    else:
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"`{name}`: file not found: {path}")
        img = _open_image(path, name)
    check_image_shape(img.width, img.height, name)
    if exif_transpose:
        img = PIL.ImageOps.exif_transpose(img)
    return to_rgb(img, name, drop_alpha=drop_alpha)


#: Pillow modes `convert("RGB")` maps without losing range (8 bits per channel; LAB and CMYK are colour-converted)
_RGB_MODES = ("1", "L", "P", "RGB", "RGBX", "YCbCr", "HSV", "LAB", "CMYK")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
#: how far a float image may stray past its range (resampling overshoot) before it is refused; such values are clipped
FLOAT_SLACK = 1e-3


def to_rgb(image: PIL.Image.Image, name: str = "image", drop_alpha: bool = False) -> PIL.Image.Image:
    """Any image Pillow opens -> 8-bit RGB without clipping: 16-bit (`I;16*`) scaled by 255/65535, 32-bit
    integer (`I`) by the smallest of 8, 16 or 31 bits that holds its largest value, float (`F`) from [0, 1] (or
    [0, 255], Pillow's own convention, when its values exceed 1; overshoots within `FLOAT_SLACK` are clipped),
    transparent pixels (alpha, or a palette's transparent colour) composited over white (the letterbox fill), or
    with `drop_alpha` (the original's `convert("RGB")`, which `reproduce_original=True` asks for) the colour they
    hide. Negative, non-finite or out-of-range values and unknown modes raise `ValueError` naming `name` (Pillow's
    own `convert("RGB")` clips 16-bit and float images to white and black).

    Example:
        >>> import numpy as np, PIL.Image
        >>> sixteen_bit = PIL.Image.fromarray(np.full((4, 4), 32896, np.uint16))  # mid grey in 16 bits
        >>> to_rgb(sixteen_bit).getpixel((0, 0))
        (128, 128, 128)
    """
    mode = image.mode
    transparent = mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in image.info)
    if transparent and drop_alpha:  # Pillow's own conversion (La, which it cannot convert, through RGBA)
        return (_unpremultiplied(image) if mode == "La" else image).convert("RGB")
    if transparent:
        rgba = _unpremultiplied(image) if mode in ("RGBa", "La") else image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _RGB_MODES:
        return image.convert("RGB")
    if mode.startswith("I;16"):
        return _gray_to_rgb(np.asarray(image, dtype=np.float64) * (255.0 / 65535.0))
    if mode == "I":
        values = np.asarray(image, dtype=np.int64)
        if values.size and values.min() < 0:
            raise ValueError(f"`{name}`: a 32-bit integer image with negative values; save it as 8- or 16-bit.")
        top = int(values.max(initial=0))
        scale = next(2**bits - 1 for bits in (8, 16, 31) if top <= 2**bits - 1)
        return _gray_to_rgb(values * (255.0 / scale))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if not np.isfinite(values).all() or low < -FLOAT_SLACK or high > 255 + FLOAT_SLACK:
            raise ValueError(
                f"`{name}`: a floating-point image with values in [{low:g}, {high:g}]; expected 0 to 1 (or 0 to "
                "255): save it as 8- or 16-bit."
            )
        return _gray_to_rgb(values * 255.0 if high <= 1.0 + FLOAT_SLACK else values)
    raise ValueError(f"`{name}`: Pillow image mode {mode!r} is not supported; save the image as 8-bit RGB.")


def _gray_to_rgb(values: np.ndarray) -> PIL.Image.Image:
    return PIL.Image.fromarray(np.rint(values).clip(0, 255).astype(np.uint8)).convert("RGB")


def _unpremultiplied(image: PIL.Image.Image) -> PIL.Image.Image:
    """`RGBa` / `La` (colour premultiplied by alpha) -> `RGBA`."""
    values = np.asarray(image, dtype=np.float64)
    colour, alpha = values[..., :-1], values[..., -1:]
    colour = np.where(alpha > 0, colour * 255.0 / np.maximum(alpha, 1), 0)
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    rgba = np.concatenate([colour, alpha], axis=-1)
    return PIL.Image.fromarray(np.rint(rgba).clip(0, 255).astype(np.uint8), "RGBA")


#: widest aspect ratio (long side / short side) an input image may have: the buckets span about 1:4.5 to 4.5:1 and
#: a letterboxed image beyond 1:8 would keep only a sliver of pixels (a 1 x 4000 image would be 0 pixels wide).
MAX_IMAGE_ASPECT = 8.0


def _open_image(path: Path, name: str) -> PIL.Image.Image:
    """Open and decode `path`; a decompression bomb (more than `PIL.Image.MAX_IMAGE_PIXELS` pixels, checked from
    the header before any pixel is decoded) or an unreadable file -> `ValueError` naming `name`."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            img = PIL.Image.open(path)
            img.load()
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning):
        limit = PIL.Image.MAX_IMAGE_PIXELS
        raise ValueError(
            f"`{name}`: {path} has more pixels than the limit of {limit} "
            "(a decompression bomb or a far too large image); use a smaller image."
        ) from None
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"`{name}`: {path} is not a readable image ({error}).") from None
    return img


def check_image_shape(width: int, height: int, name: str = "image") -> None:
    """Refuse images no resolution bucket can use: empty, or an aspect ratio beyond `MAX_IMAGE_ASPECT`."""
    if width < 1 or height < 1:
        raise ValueError(f"`{name}`: the image is empty ({width} x {height} pixels).")
    if max(width, height) / min(width, height) > MAX_IMAGE_ASPECT:
        raise ValueError(
            f"`{name}`: a {width} x {height} image has an aspect ratio beyond 1:{MAX_IMAGE_ASPECT:g}; "
            "the resolution buckets cannot use it (crop it nearer to the output's shape)."
        )


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
                    frames.append(_frame_array(frame, apply_rotation))
        except av.error.FFmpegError as error:
            raise ValueError(f"`{name}`: {path} is not a readable video ({error}).") from None
        if not frames:
            raise ValueError(f"`{name}`: {path} has no decodable frames.")
        return stack_frames(frames, name), fps
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu().numpy()
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"`{name}` array must be [F, H, W, 3], got {video.shape}.")
        if video.dtype != np.uint8:
            video = to_uint8(video)
        return video, None
    if isinstance(video, (list, tuple)) and video and all(isinstance(f, PIL.Image.Image) for f in video):
        return stack_frames([np.asarray(to_rgb(f, name)) for f in video], name), None
    raise ValueError(f"`{name}` must be a path, a [F, H, W, 3] array or a list of PIL images, got {type(video)}.")


#: frames decoded before the tail's first frame after a seek, to be sure it starts before the frames that are kept
SEEK_MARGIN_FRAMES = 8


def load_video_tail(
    video: VideoInput, num_frames: int | None, name: str = "video", apply_rotation: bool = True
) -> tuple[np.ndarray, float | None]:
    """The last `num_frames` frames of a video (all of them when `num_frames` is None) and its frame rate, holding
    at most `num_frames` decoded frames at a time.

    For a file, the duration and frame rate come from the container's stream metadata; the decoder seeks to a
    keyframe shortly before the tail and decodes to the end through a ring buffer of `num_frames` frames. When the
    seek lands too late (imprecise index, no duration) the whole file is streamed through the same ring buffer, so
    memory stays bounded by what is returned either way. Fewer frames are returned when the video is shorter.
    """
    if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
        raise ValueError(f"`num_frames` must be a positive integer or None, got {num_frames!r}.")
    if not isinstance(video, (str, os.PathLike)):
        frames, fps = load_video(video, name=name, apply_rotation=apply_rotation)
        return (frames[-num_frames:] if num_frames else frames), fps
    import av

    path = Path(video)
    if not path.is_file():
        raise ValueError(f"`{name}`: file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"`{name}`: {path} has no video stream.")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            tail = None
            if num_frames is not None and _seek_tail(container, stream, num_frames, fps):
                tail = _decode_ring(container, stream, num_frames)
                if len(tail) < num_frames:  # the seek landed too late: start again from the beginning
                    tail = None
                    container.seek(0)
            if tail is None:
                tail = _decode_ring(container, stream, num_frames)
            frames, sizes = None, set()
            for i in reversed(range(len(tail))):  # into one array, releasing each decoded frame as it is converted
                array = _frame_array(tail[i], apply_rotation)
                tail[i] = None
                if frames is None:  # the last frame's size: the one the continuation starts from
                    frames = np.empty((len(tail), *array.shape), dtype=np.uint8)
                sizes.add(array.shape[:2])
                frames[i] = array if array.shape == frames.shape[1:] else _resized(array, frames.shape[1:3])
            if len(sizes) > 1:
                _warn_sizes(name, sizes, frames.shape[1:3])
    except av.error.FFmpegError as error:
        raise ValueError(f"`{name}`: {path} is not a readable video ({error}).") from None
    if frames is None:
        raise ValueError(f"`{name}`: {path} has no decodable frames.")
    return frames, fps


def _seek_tail(container, stream, num_frames: int, fps: float | None) -> bool:
    """Seek to a keyframe at or before `num_frames + SEEK_MARGIN_FRAMES` frames from the end (stream metadata);
    False when the duration or frame rate is unknown or the tail starts at the beginning anyway."""
    if not fps or stream.time_base is None:
        return False
    if stream.duration:
        duration = float(stream.duration * stream.time_base)
    elif container.duration:
        duration = container.duration / 1_000_000
    else:
        return False
    start = duration - (num_frames + SEEK_MARGIN_FRAMES) / fps
    if start <= 0:
        return False
    offset = int(start / stream.time_base) + (stream.start_time or 0)
    container.seek(offset, stream=stream, backward=True, any_frame=False)
    return True


def _decode_ring(container, stream, num_frames: int | None) -> list:
    """Decode `stream` from the current position to the end, keeping only the last `num_frames` frames."""
    from collections import deque

    ring = deque(maxlen=num_frames)
    for frame in container.decode(stream):
        ring.append(frame)
    return list(ring)


def _frame_array(frame, apply_rotation: bool) -> np.ndarray:
    array = frame.to_ndarray(format="rgb24")
    turns = _frame_rotation(frame) if apply_rotation else 0
    return np.rot90(array, k=turns).copy() if turns else array


def stack_frames(frames: list[np.ndarray], name: str = "video") -> np.ndarray:
    """RGB frames -> one `[F, H, W, 3]` array; frames of another size than the last (a video whose frame size
    changes) are scaled to the last frame's size, the one a continuation starts from, with a warning."""
    size = frames[-1].shape[:2]
    sizes = {frame.shape[:2] for frame in frames}
    if len(sizes) > 1:
        _warn_sizes(name, sizes, size)
        frames = [frame if frame.shape[:2] == size else _resized(frame, size) for frame in frames]
    return np.stack(frames)


def _resized(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    return np.asarray(PIL.Image.fromarray(frame).resize((width, height), PIL.Image.BICUBIC))


def _warn_sizes(name: str, sizes: set, size: tuple[int, int]) -> None:
    shown = ", ".join(f"{w} x {h}" for h, w in sorted(sizes))
    logger.warning(
        f"`{name}`: the frame size changes within the video ({shown}); every frame is scaled to the last "
        f"frame's {size[1]} x {size[0]}."
    )


def to_uint8(frames, truncate: bool = False) -> np.ndarray:
    """Float frames in [0, 1] -> uint8 by rounding, or by truncation with `truncate=True` (the original's extension
    and avatar pipelines truncated, which darkens every frame by half a level on average and compounds across
    extension chunks)."""
    if isinstance(frames, torch.Tensor):  # on the tensor's device: a quarter of the bytes cross to the host
        scaled = frames.detach().float() * 255.0  # float32 IEEE ops: the same values as the NumPy lines below
        scaled = scaled if truncate else torch.round(scaled)  # round half to even, as np.rint
        return scaled.clamp_(0, 255).to(torch.uint8).cpu().numpy()  # float -> uint8 truncates, as astype
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    scaled = frames * np.float32(255.0)
    return np.clip(scaled if truncate else np.rint(scaled), 0, 255).astype(np.uint8)


def pixels_to_uint8(pixels: torch.Tensor, truncate: bool = False) -> np.ndarray:
    """Pixels in [-1, 1], channels last -> uint8 (rounded, or truncated as the original's extension pipelines)."""
    return to_uint8((pixels / 2 + 0.5).clamp(0, 1), truncate=truncate)


#: a temporary file of `write_video` next to `path`: `.<name>.<pid>.<random>.tmp` (the pid tells whether its writer
#: is still alive, so that a later write can sweep what a killed one left); the pattern matches any output's name
#: (names with unique suffixes, as the web app's, would otherwise never be swept)
TEMP_SUFFIX = ".tmp"
_TEMP_PATTERN = re.compile(rf"^\..+\.(\d+)\.[0-9a-f]{{8}}{re.escape(TEMP_SUFFIX)}$")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def sweep_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that killed writes left in `path`'s folder (only names of `write_video`'s own
    pattern, for any output name, and only when the process named by their pid is gone); returns what was
    removed."""
    removed = []
    try:
        entries = list(Path(path).parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_PATTERN.match(entry.name)
        if match and not pid_alive(int(match.group(1))):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def _create_temp_file(path: Path) -> Path:
    """A new empty file next to `path`, created with mode 0o666 minus the umask (as `open(path, "w")` would: the
    final file gets the permissions a plain write would give it, not mkstemp's 0o600)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name next to {path}")


@contextlib.contextmanager
def sigterm_as_exit():
    """In the main thread, while the default SIGTERM action is in place: turn SIGTERM into `SystemExit(143)` so that
    clean-up code runs (the default action would kill the process past every `finally`). Otherwise a no-op."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and never replaces: FileExistsError when `path` appeared meanwhile
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def write_video(
    frames,
    path: str | os.PathLike,
    fps: float,
    audio: np.ndarray | None = None,
    audio_sample_rate: int | None = None,
    crf: int = 10,
    overwrite: bool = True,
) -> Path:
    """Write frames (`[F, H, W, 3]`, uint8 or float in [0, 1]) as H.264 mp4 (yuv420p, CRF 10 like the original),
    optionally with a mono/stereo float waveform muxed in as AAC.

    The file appears atomically with the permissions of a plain write (0o666 minus the umask): it is written next to
    `path` under a hidden temporary name (`.<name>.<pid>.<random>.tmp`) and renamed at the end. The temporary file
    is removed on any failure, Ctrl-C or SIGTERM (main thread); one left by a process killed outright is swept by the
    next write into the same folder. `overwrite=False` refuses to replace an existing file (`FileExistsError`, also when
    it appears during the write)."""
    frames = to_uint8(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty [F, H, W, 3] array, got {frames.shape}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and path.exists():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
    sweep_stale_temp_files(path)
    with sigterm_as_exit():
        tmp = _create_temp_file(path)
        try:
            _encode_mp4(str(tmp), frames, fps, audio, audio_sample_rate, crf)
            _move_into_place(tmp, path, overwrite)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return path


def _encode_mp4(filename: str, frames: np.ndarray, fps: float, audio, audio_sample_rate, crf: int) -> None:
    import av

    rate = Fraction(fps).limit_denominator(1001)
    with av.open(filename, mode="w", format="mp4") as container:
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


#: a growing mp4 is fragmented: its header (with the edit lists that keep audio and video in step) goes out with the
#: first fragment, then a fragment starts at every keyframe (every appended window starts with one) and at least
#: every `FRAGMENT_SECONDS`; a player or `ffprobe` reads every complete fragment while the file grows
GROWING_MOVFLAGS = "frag_keyframe+delay_moov+default_base_moof"
FRAGMENT_SECONDS = 0.5
#: audio muxed ahead of the last written frame (in AAC frames), so that the muxer writes every video frame out
AUDIO_LEAD_FRAMES = 2


def partial_path(output: str | os.PathLike) -> Path:
    """Where the growing video of `output` is written while it is generated: `<stem>.partial.mp4` beside it."""
    output = Path(output)
    return output.with_name(f"{output.stem}.partial.mp4")


class GrowingVideoWriter:
    """An H.264 mp4 that grows window by window while a long video is generated: it plays (with the audio up to the
    last written frame) at any time, and `finish(output)` turns it into the normal mp4.

    Each `append(frames)` (uint8 or float in [0, 1] `[n, H, W, 3]`) is encoded on a background thread, so the
    caller goes on (generating the next window) meanwhile; at most `queue_size` windows wait, which bounds the
    memory. Every window is encoded by its own H.264 encoder (CRF `crf`, a closed group of pictures starting with a
    keyframe): a window is the same video whether it comes from a generator or from a resume folder (its bytes may
    differ: x264 through PyAV is not byte-reproducible from run to run here), and each window is in the file, whole,
    once the next fragment starts (at the latest `FRAGMENT_SECONDS` of video
    later, or at `close`). The audio (mono or stereo float waveform, optional) is one AAC stream, muxed as the video
    grows. The file is `path` (e.g. `partial_path(output)`); it is created with the first window. An error of the
    background thread is raised by the next `append` or `close`; `close` (also on leaving a `with` block) ends the
    file, a playable mp4 of what was appended.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float,
        audio: np.ndarray | None = None,
        audio_sample_rate: int | None = None,
        crf: int = 10,
        queue_size: int = 1,
    ):
        import queue

        if audio is not None and audio_sample_rate is None:
            raise ValueError("`audio_sample_rate` is required with `audio`.")
        self.path, self.fps, self.crf = Path(path), fps, crf
        self.audio = None if audio is None else _mono_or_stereo(np.asarray(audio, dtype=np.float32))
        self.audio_sample_rate = audio_sample_rate
        self.frames_written = 0  # frames encoded and muxed (by the background thread)
        self._queue, self._thread, self._error, self._closed = queue.Queue(maxsize=queue_size), None, None, False
        self._shape = None

    def __enter__(self) -> GrowingVideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
            return
        try:
            self.close()  # keep what was written playable; the body's error is the one raised
        except Exception:  # noqa: BLE001
            pass

    def append(self, frames) -> None:
        """Queue one window's frames (returns at once unless `queue_size` windows are already waiting)."""
        frames = to_uint8(frames)
        if self._closed:
            raise ValueError(f"{self.path} is closed.")
        if frames.ndim != 4 or frames.shape[-1] != 3 or (self._shape and frames.shape[1:] != self._shape):
            raise ValueError(f"frames must be [n, H, W, 3] of one size for the whole video, got {frames.shape}.")
        self._raise_error()
        if not len(frames):
            return
        self._shape = frames.shape[1:]
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="GrowingVideoWriter", daemon=True)
            self._thread.start()
        self._queue.put(frames)

    def wait(self) -> None:
        """Block until every appended window is in the file (up to the fragment being written)."""
        if self._thread is not None:
            self._queue.join()
        self._raise_error()

    def close(self) -> Path:
        """Wait for the queued windows, mux the rest of the audio and end the file; returns its path."""
        if not self._closed:
            self._closed = True
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
        self._raise_error()
        return self.path

    def finish(self, output: str | os.PathLike, overwrite: bool = True) -> Path:
        """`close`, then write the normal mp4 (not fragmented, index first) at `output` from the same packets (no
        re-encoding) atomically, as `write_video` does, and delete the growing file. Raises `FileExistsError` when
        `output` exists and `overwrite` is False (the growing file is kept then, and on any other failure)."""
        self.close()
        if self._thread is None:
            raise ValueError("no frames were appended: there is no video to finish.")
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        if not overwrite and output.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(output))
        sweep_stale_temp_files(output)
        with sigterm_as_exit():
            tmp = _create_temp_file(output)
            try:
                remux_mp4(self.path, tmp)
                _move_into_place(tmp, output, overwrite)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        self.path.unlink(missing_ok=True)
        return output

    @property
    def seconds_written(self) -> float:
        return self.frames_written / self.fps

    # ------------------------------------------------------------------------------------------ background thread
    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _work(self) -> None:
        """Encode queued windows until the end marker (None); after an error, skip the rest (the caller sees it)."""
        state = None
        try:
            while True:
                frames = self._queue.get()
                try:
                    if frames is None:
                        if state is not None and self._error is None:
                            self._mux_audio(state, None)
                        return
                    if self._error is None:
                        state = state or self._open(frames.shape[1:3])
                        self._encode_window(state, frames)
                        self._mux_audio(state, self._audio_target(state))
                except BaseException as error:  # noqa: BLE001 (raised in the caller's thread)
                    self._error = self._error or error
                    if frames is None:
                        return
                finally:
                    self._queue.task_done()
        finally:
            if state is not None:
                try:
                    state["container"].close()
                except Exception as error:  # noqa: BLE001
                    self._error = self._error or error

    def _open(self, size: tuple[int, int]) -> dict:
        import av

        self.path.parent.mkdir(parents=True, exist_ok=True)
        options = {"movflags": GROWING_MOVFLAGS, "frag_duration": str(int(FRAGMENT_SECONDS * 1e6))}
        container = av.open(str(self.path), mode="w", format="mp4", options={**options, "flush_packets": "1"})
        rate = Fraction(self.fps).limit_denominator(1001)
        video = container.add_stream("libx264", rate=rate)
        video.height, video.width = size
        video.pix_fmt = "yuv420p"
        video.options = {"crf": str(self.crf)}
        state = {"container": container, "video": video, "rate": rate, "audio": None, "samples": 0}
        if self.audio is not None:
            audio = container.add_stream("aac", rate=int(self.audio_sample_rate))
            audio.layout = "mono" if self.audio.ndim == 1 else "stereo"
            state["audio"] = audio
        return state

    def _encoder(self, state: dict):
        """The first window uses the stream's own encoder; every later one a new encoder with the same settings
        (whose stream headers must be the stream's, checked)."""
        import av
        from av.codec.context import Flags

        video = state["video"]
        if self.frames_written == 0:
            return video.codec_context
        encoder = av.CodecContext.create("libx264", "w")
        encoder.width, encoder.height, encoder.pix_fmt = video.width, video.height, "yuv420p"
        encoder.time_base, encoder.framerate = 1 / state["rate"], state["rate"]
        encoder.options = {"crf": str(self.crf)}
        encoder.flags |= Flags.global_header
        encoder.open()
        if bytes(encoder.extradata or b"") != bytes(video.codec_context.extradata or b""):
            raise RuntimeError("the H.264 encoder of a later window gave other stream headers than the first one")
        return encoder

    def _encode_window(self, state: dict, frames: np.ndarray) -> None:
        import av

        encoder, video, container = self._encoder(state), state["video"], state["container"]
        packets = []
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts, frame.time_base = self.frames_written + i, 1 / state["rate"]
            packets.extend(encoder.encode(frame))
        packets.extend(encoder.encode(None))  # the whole window out: its own closed group of pictures
        for packet in packets:
            packet.stream, packet.duration = video, 1
            container.mux(packet)
        self.frames_written += len(frames)

    def _audio_target(self, state: dict) -> int:
        if state["audio"] is None:
            return 0
        frame_size = state["audio"].codec_context.frame_size or 1024
        return round(self.seconds_written * self.audio_sample_rate) + AUDIO_LEAD_FRAMES * frame_size

    def _mux_audio(self, state: dict, until: int | None) -> None:
        """Encode the audio from where it stopped up to sample `until` (whole AAC frames), or all of it and the
        encoder's tail (`until` None)."""
        import av

        stream = state["audio"]
        if stream is None:
            return
        container, planar = state["container"], self.audio[None, :] if self.audio.ndim == 1 else self.audio.T
        frame_size = stream.codec_context.frame_size or 1024
        end = planar.shape[1] if until is None else min(until, planar.shape[1])
        while state["samples"] < end and (until is None or state["samples"] + frame_size <= end):
            start = state["samples"]
            chunk = np.ascontiguousarray(planar[:, start : start + frame_size])
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=stream.layout.name)
            frame.sample_rate, frame.pts = int(self.audio_sample_rate), start
            for packet in stream.encode(frame):
                container.mux(packet)
            state["samples"] = start + chunk.shape[1]
        if until is None:
            for packet in stream.encode():
                container.mux(packet)


def _mono_or_stereo(audio: np.ndarray) -> np.ndarray:
    """`[samples]` or `[samples, 2]`; mono as `[samples, 1]` and more than two channels are mixed down to mono."""
    if audio.ndim == 2 and audio.shape[1] != 2:
        return audio.mean(axis=1)
    return audio


def remux_mp4(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy every audio and video packet of `source` into a normal mp4 `target` (one index, written first)."""
    import av

    with (
        av.open(str(source)) as inp,
        av.open(str(target), "w", format="mp4", options={"movflags": "faststart"}) as out,
    ):
        kept = [s for s in inp.streams if s.type in ("video", "audio")]
        streams = {s.index: out.add_stream_from_template(s) for s in kept}
        for packet in inp.demux(*kept):
            if packet.dts is None:  # the demuxer's end-of-stream marker
                continue
            packet.stream = streams[packet.stream.index]
            out.mux(packet)


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
