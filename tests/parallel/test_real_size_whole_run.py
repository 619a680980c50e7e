"""The whole parallel run equals one process at the real shapes of a run, for every task: `app.run.run` (what
`skyreels-v3 generate` does) under torchrun with 2 gloo processes (text/audio encoders once on rank 0, Ulysses 2, the
parallel VAE, `--shard-weights`) against one process with the VAE tiled alike, in float32 on CPU, with the narrow
components of `tests/parallel/real_size_worker.py` at 720P (reference: 4 reference frames and 3,600 tokens per
latent frame, 39,600 tokens; extension and shot switching: condition frames and per-frame timesteps, 57,600 tokens;
28 VAE tiles) and the avatar's 480P windows (keyframe clip + one window: 32,760 tokens per clip, motion frames, CLIP
on every rank, 15 VAE tiles split 8 + 7). Tiny shapes passed while real-size runs were doubted; these shapes are the
real ones (fewer frames for the 720P tasks only: the 5-s runs, 126,000 and 144,000 tokens, were compared once, every
stage bit-identical; `docs/parallel.md`).

Every stage is compared: the inputs of each transformer call (noise, reference/condition latents, timesteps) and
every embedding must be bit-identical (rank 0's encoders broadcast exact tensors; the parallel VAE encodes exactly
as one process); transformer outputs and latents agree to float32 rounding; a decoded clip is bit-identical where
its latents are, else within what the 2-channel test VAE makes of rounding (its RMS norms normalise 2-vectors: a
1e-7 relative change of the latents moves a few hundred of a clip's values by up to 0.1, on one process too); the
mp4 likewise. A rank computing with other weights, noise, positions or tiles is off by whole levels on average.

CPU time (2 shared cores, 2026-12-07; one process + two processes): reference 38 + 57 s, extension 88 + 121 s, shot
switching 77 + 106 s, avatar 113 + 177 s. `-m "slow and not real_size"` leaves them out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel.real_size_worker import PROFILES, write_inputs
from tests.parallel.test_context_parallel import free_port


ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
PROFILE = "ci"
# inputs every transformer call gets exactly: text and audio embeddings (broadcast once), timesteps
EXACT_INPUTS = ("in.encoder_hidden_states", "in.audio_embeds", "in.timestep")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real_size_inputs")
    write_inputs(folder)
    return folder


def run_both(task: str, inputs: Path, out: Path) -> list[dict]:
    worker = ["-m", "tests.parallel.real_size_worker", str(out), str(inputs), task, PROFILE]
    single = subprocess.run(
        [sys.executable, *worker], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900, check=False
    )
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *worker,
    ]
    parallel = subprocess.run(torchrun, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900, check=False)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    return [json.loads((out / f"{task}_rank{rank}.json").read_text()) for rank in (0, 1)]


def check_stages(summary: dict) -> None:
    assert not summary["missing_here"] and not summary["extra_here"], summary
    stages = summary["stages"]
    assert all("max_abs" in row for row in stages.values()), stages  # every stage there, with its shape
    for name, row in stages.items():
        if name.startswith("forward.0.in.") or name.endswith(EXACT_INPUTS):
            assert row["max_abs"] == 0, (name, row)  # noise, references, conditions, embeddings, timesteps
        elif ".in." in name:  # a window's motion latents / frame: through the previous clip's rounding
            assert row["max_abs"] <= 1e-5, (name, row)
        elif name.startswith(("forward.", "step.")):  # transformer outputs, latents after each step
            assert row["relative"] <= 1e-6 and row["max_abs"] <= 1e-5, (name, row)
    clips = sum(1 for name in stages if name.startswith("decoded."))
    steps = sum(1 for name in stages if name.startswith("step."))
    for clip in range(clips):
        row, latents = stages[f"decoded.{clip}"], stages[f"step.{(clip + 1) * steps // clips - 1}.latents"]
        if latents["max_abs"] == 0:
            assert row["max_abs"] == 0, (clip, row)  # the parallel VAE decodes as one process does
        else:
            assert row["mean_abs"] <= 1e-5 and row["relative"] <= 2e-3, (clip, row)
    video = stages["mp4"]  # uint8 levels
    if all(stages[f"decoded.{clip}"]["max_abs"] == 0 for clip in range(clips)):
        assert video["max_abs"] == 0, video
    else:
        assert video["mean_abs"] <= 0.01 and video["max_abs"] <= 8, video


@pytest.mark.slow
@pytest.mark.real_size
@pytest.mark.parametrize("task", list(PROFILES[PROFILE]))
def test_parallel_whole_run_equals_one_process_at_real_size(task, inputs, tmp_path):
    ranks = run_both(task, inputs, tmp_path)
    for summary in ranks:
        check_stages(summary)
    first = ranks[0]["stages"]["forward.0.in.hidden_states"]["shape"]
    height, width, _ = PROFILES[PROFILE][task]
    assert first[-2:] == [height // 8, width // 8]  # the real latent grid
