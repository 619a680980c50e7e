"""Output files of a run: the early writability check, the default and unique names, and the final write that
never loses a finished run's frames."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from ..pipelines.video_io import write_video
from .request import GenerationRequest, RequestError


def check_output_writable(output: Path, overwrite: bool = False) -> None:
    """Refuse, before any model work, an output that exists (unless `overwrite`) or whose folder cannot be created
    or written (a probe file is written and removed)."""
    import tempfile

    if output.suffix.lower() != ".mp4":
        raise RequestError("output", f"must end in .mp4, got {output}")
    if output.is_dir():
        raise RequestError("output", f"{output} is a folder; give the path of an .mp4 file")
    if output.is_symlink() and not output.exists():
        raise RequestError(
            "output",
            f"{output} is a symbolic link to {os.readlink(output)}, which does not exist; remove the link or pick "
            "another name",
        )
    if output.exists() and not overwrite:
        raise RequestError("output", f"{output} exists; pass --overwrite to replace it or pick another name")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=".skyreels-v3-probe-"):
            pass
    except OSError as error:
        raise RequestError("output", f"cannot write to {output.parent} ({error.strerror or error})") from None


def write_or_keep(frames: np.ndarray, output: Path, overwrite: bool = False, unique: bool = False, **kwargs) -> Path:
    """Write the mp4 (never replacing a file unless `overwrite`; with `unique`, a name taken meanwhile gets the next
    free suffix instead); if that still fails after a finished run, keep the frames in a temporary `.npy` file and
    say where (a finished GPU run is never lost)."""
    import tempfile

    while True:
        try:
            return write_video(frames, output, overwrite=overwrite, **kwargs)
        except FileExistsError as error:
            if unique and not overwrite:
                output = unique_path(output)
                continue
            failure = OSError(error.errno, "it appeared during the run; pass --overwrite to replace it")
        except OSError as error:
            failure = error
        break
    fd, kept = tempfile.mkstemp(prefix="skyreels-v3-frames-", suffix=".npy")
    with os.fdopen(fd, "wb") as file:
        np.save(file, frames)
    raise RequestError(
        "output",
        f"writing {output} failed ({failure.strerror or failure}); the {len(frames)} generated "
        f"frames are kept in {kept} (numpy.load it, or write it with "
        "skyreels_diffusers.pipelines.video_io.write_video)",
    ) from None


def unique_path(path: Path) -> Path:
    """`path`, or the first of `<stem>-1<suffix>`, `<stem>-2<suffix>`, ... that does not exist."""
    candidate, number = path, 0
    while os.path.lexists(candidate):  # a dangling link is taken too
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def default_output_path(request: GenerationRequest) -> Path:
    """result/<task>/<seed>_<date>_<time>.mp4, with a -1, -2, ... suffix when that name is taken (two runs in one
    second)."""
    return unique_path(Path("result") / request.task / f"{request.seed}_{time.strftime('%Y-%m-%d_%H-%M-%S')}.mp4")


def write_windows(pipe, kwargs: dict, output: Path, request: GenerationRequest, should_stop=None) -> Path | None:
    """Run a pipeline that makes its video window by window (`pipe.windows`: the talking avatar) and write the mp4 as
    it grows: `<output stem>.partial.mp4` plays while the run goes on and becomes `output` at the end (a normal mp4,
    the same packets). With `resume_dir` among `kwargs`, the finished windows of a killed run are read back (and
    re-encoded into the same growing file) and the run goes on from there. Every process generates; the main one
    writes. Returns the mp4's path (None on other processes, and when `should_stop()` turned true: a cancelled job
    leaves no file). On a failed final write the growing file is kept, and the error says where."""
    from ..parallel import is_main_process
    from ..pipelines.resume import resumable_windows
    from ..pipelines.video_io import GrowingVideoWriter, partial_path
    from .distributed import muxed_audio

    resume_dir, main = kwargs.pop("resume_dir", None), is_main_process()
    for name in ("write_resume", "output_type", "return_dict"):
        kwargs.pop(name, None)
    run = pipe.windows(**kwargs)
    windows = iter(run) if resume_dir is None else resumable_windows(run, resume_dir, writer=main)
    if not main:
        for _ in windows:
            pass
        return None
    audio, rate = run.audio, run.audio_sample_rate
    if audio is None and request.media.speech is not None:  # precomputed features (torchrun): the request's
        default = "normalized" if request.reproduce_original else "original"
        audio, rate = muxed_audio(request.media.speech, request.output_audio or default)
    writer = GrowingVideoWriter(
        partial_path(output), fps=run.fps, audio=audio, audio_sample_rate=rate, crf=request.crf
    )
    announced = False
    try:
        for window in windows:
            if len(window.frames) and not announced:
                print(f"[skyreels-v3] the video grows in {writer.path} (playable while the run goes on)", flush=True)
                announced = True
            writer.append(window.frames)
        writer.close()
    except BaseException as error:
        try:
            writer.close()
        finally:
            if should_stop is not None and should_stop():
                writer.path.unlink(missing_ok=True)
        if isinstance(error, KeyboardInterrupt) and writer.path.is_file():  # Ctrl-C: say where the video is
            raise KeyboardInterrupt(f"the video so far is in {writer.path}") from None
        raise
    if should_stop is not None and should_stop():
        writer.path.unlink(missing_ok=True)
        return None
    return finish_or_keep(writer, output, overwrite=request.overwrite, unique=not request.output)


def finish_or_keep(writer, output: Path, overwrite: bool = False, unique: bool = False) -> Path:
    """`writer.finish(output)` (with `unique`, a name taken meanwhile gets the next free suffix); on failure the
    growing file stays, and the error says where (a finished run is never lost)."""
    while True:
        try:
            return writer.finish(output, overwrite=overwrite)
        except FileExistsError as error:
            if unique and not overwrite:
                output = unique_path(output)
                continue
            failure = OSError(error.errno, "it appeared during the run; pass --overwrite to replace it")
        except OSError as error:
            failure = error
        break
    raise RequestError(
        "output",
        f"writing {output} failed ({failure.strerror or failure}); the video is kept in {writer.path} "
        "(a playable mp4 of every finished window)",
    ) from None
