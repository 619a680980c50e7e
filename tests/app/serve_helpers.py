"""Shared by the served API's tests: the CLI's output for a request, decoded frames, API field -> CLI flags."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np


#: API field -> CLI flag, for the fields the tests send
CLI_FLAGS = {
    "seconds": "--duration",
    "seed": "--seed",
    "steps": "--steps",
    "prompt": "--prompt",
    "guidance_scale": "--guidance-scale",
    "resolution": "--resolution",
    "crf": "--crf",
    "window_prompt": "--window-prompt",
}


def cli_args(body: dict) -> list[str]:
    """`skyreels-v3 generate` arguments for a JSON create body (tiny model)."""
    args = ["generate", "--model", "tiny", "--task", body["model"]]
    for name, value in body.items():
        if name == "size":
            width, height = value.split("x")
            args += ["--width", width, "--height", height]
        elif name in CLI_FLAGS:
            args += [CLI_FLAGS[name], str(value)]
    return args


def run_cli(body: dict, output: Path, extra: tuple[str, ...] = (), threads: int | None = None) -> Path:
    """The CLI's video for a request, computed with `threads` CPU threads (default: this process's). A Ray replica
    runs with as many threads as its `num_cpus` (Ray sets OMP_NUM_THREADS, at least 1), and CPU kernels sum in an
    order that depends on the thread count: the same video with 2 threads differs by up to 2 levels in a few frames,
    so a comparison with a replica's video computes the reference with the replica's thread count."""
    import torch

    from skyreels_diffusers.app.cli import main

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        assert main([*cli_args(body), *extra, "--output", str(output)]) == 0
    finally:
        torch.set_num_threads(before)
    return output


def cli_error(body: dict, capsys, output: Path, extra: tuple[str, ...] = ()) -> str:
    """The CLI's error message (without its `error: ` prefix) for the same arguments."""
    from skyreels_diffusers.app.cli import main

    capsys.readouterr()
    assert main([*cli_args(body), *extra, "--output", str(output)]) == 2
    assert not output.exists()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: "), line
    return line[len("error: ") :]


def frames(video) -> np.ndarray:
    """Every decoded RGB frame of an mp4 (a path or its bytes)."""
    source = io.BytesIO(video) if isinstance(video, bytes) else str(video)
    with av.open(source) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def audio(video) -> np.ndarray | None:
    source = io.BytesIO(video) if isinstance(video, bytes) else str(video)
    with av.open(source) as container:
        if not container.streams.audio:
            return None
        return np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])


def assert_same_video(served, reference) -> None:
    """Same frames, same audio track (the served mp4 against the CLI's). Both must be lossless (`crf` 0): at other
    CRFs libx264's lookahead makes a few frames differ from one encode of the same frames to the next."""
    got, want = frames(served), frames(reference)
    assert got.shape == want.shape, f"served frames {got.shape}, the CLI's {want.shape}"
    differ = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert np.array_equal(got, want), (
        f"frames differ: max {differ.max()}, in {np.count_nonzero(differ.max(axis=(1, 2, 3)))} frames"
    )
    served_audio, reference_audio = audio(served), audio(reference)
    assert (served_audio is None) == (reference_audio is None)
    if reference_audio is not None:
        assert np.array_equal(served_audio, reference_audio)
