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
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return candidate


def default_output_path(request: GenerationRequest) -> Path:
    """result/<task>/<seed>_<date>_<time>.mp4, with a -1, -2, ... suffix when that name is taken (two runs in one
    second)."""
    return unique_path(Path("result") / request.task / f"{request.seed}_{time.strftime('%Y-%m-%d_%H-%M-%S')}.mp4")
