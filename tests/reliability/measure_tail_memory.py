"""Peak resident memory of decoding a 10-s 1080p clip whole (`load_video`) vs its tail (`load_video_tail`), each
in a fresh process (ru_maxrss). Used for the figures in docs/reliability.md:

    HF_HUB_OFFLINE=1 PYTHONPATH=src:. python -m tests.reliability.measure_tail_memory
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np


def make_clip(path: Path, height: int = 1080, width: int = 1920, frames: int = 240) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(24))
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "30"}  # libx264's default: one keyframe per 250 frames
        base = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(base, i * 8, axis=1), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def measure(mode: str, path: str) -> dict:
    from skyreels_diffusers.pipelines.video_io import load_video, load_video_tail

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    frames, _ = load_video(path) if mode == "full" else load_video_tail(path, int(mode))
    return {
        "call": "load_video" if mode == "full" else f"load_video_tail({mode})",
        "frames": len(frames),
        "rss_before_MiB": round(before / 1024),
        "rss_peak_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    if len(sys.argv) == 3:
        print(json.dumps(measure(sys.argv[1], sys.argv[2])))
        return
    with tempfile.TemporaryDirectory() as folder:
        clip = Path(folder) / "clip_1080p.mp4"
        make_clip(clip)
        for mode in ("full", "25", "33"):
            out = subprocess.run(
                [sys.executable, "-m", "tests.reliability.measure_tail_memory", mode, str(clip)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
