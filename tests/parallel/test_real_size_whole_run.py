"""The whole parallel run equals one process at the real shapes of a run, for every task: `app.run.run` (what
`skyreels-v3 generate` does) under torchrun with 2 gloo processes (text/audio encoders once on rank 0, Ulysses 2, the
parallel VAE, `--shard-weights`) against one process with the VAE tiled alike, in float32 on CPU, with the narrow
components of `tests/parallel/real_size_worker.py` at 720P (reference: 4 reference frames and 3,600 tokens per
latent frame; extension and shot switching: 25 and 9 condition frames and per-frame timesteps; 28 VAE tiles) and
the avatar's 480P 81-frame windows (keyframe clip + two windows, the second on the first one's motion frames:
32,760 tokens per clip, the pseudo end frames from the keyframe clip, 15 VAE tiles split 8 + 7). Tiny shapes passed while real-size runs were doubted; these spatial
shapes are the real ones. The "ci" profile (default) generates as few frames as each task allows and runs a 1-block
transformer; `REAL_SIZE_PROFILE=full` runs what this test ran before (1-s reference and extension at 24 fps, a
2-block transformer), `REAL_SIZE_PROFILE=long` the 5-s runs of `docs/parallel.md`.

Every stage is compared: the inputs of each transformer call (noise, reference/condition latents, timesteps) and
every embedding must be bit-identical (rank 0's encoders broadcast exact tensors; the parallel VAE encodes exactly
as one process); transformer outputs and latents agree to float32 rounding; a decoded clip is bit-identical where
its latents are, else within what the 2-channel test VAE makes of rounding (its RMS norms normalise 2-vectors: a
1e-7 relative change of the latents moves a few hundred of a clip's values by up to 0.1, on one process too); the
mp4 likewise. A rank computing with other weights, noise, positions or tiles is off by whole levels on average.
Since the avatar's audio attention attends run by run under sharding (as one process does), every stage of every
task is in fact bit-identical (2026-12-07); the tolerances stay for platforms whose kernels round a slice otherwise.

All four tasks run in three worker processes (imports once each): the one-process runs in two processes side by
side (the avatar; the other three), then one torchrun for every task, started as soon as the three are done (its
ranks wait for the avatar's one-process run). On 2 idle cores (2026-12-07, "ci"): 142 s for the four, 275 s of CPU
(one process + two: reference 5 + 5 s, shot switching 8 + 10 s, extension 22 + 29 s, avatar 68 + 80 s, the rest
imports and inputs); before, one task at a time with 2-block 24-fps runs: 59, 115, 138 and 169 s (488 s, 690 s of
CPU, a third of it page faults). `-m "slow and not real_size"` leaves them out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import torchrun_command
from tests.parallel.real_size_worker import PROFILE_ENV, PROFILES


ROOT = Path(__file__).resolve().parents[2]
PROFILE = os.environ.get(PROFILE_ENV, "ci")
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
    "OMP_NUM_THREADS": "1",
    # glibc keeps freed memory for reuse instead of unmapping it: a third of these runs' CPU went to page faults
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
}
#: the one-process runs: two processes side by side, of about the same CPU time
ONE_PROCESS = (["talking_avatar"], ["reference_to_video", "shot_switching_extension", "single_shot_extension"])
TIMEOUT_S = 1200
# inputs every transformer call gets exactly: text and audio embeddings (broadcast once), timesteps
EXACT_INPUTS = ("in.encoder_hidden_states", "in.audio_embeds", "in.timestep")


def start(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as sink:  # its own process group: stopped with its torchrun ranks (`stop`)
        return subprocess.Popen(
            command, cwd=ROOT, env=ENV, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish(process: subprocess.Popen, log: Path) -> None:
    code = process.wait(timeout=TIMEOUT_S)
    assert code == 0, f"{' '.join(process.args[2:])} exited with {code}:\n{log.read_text()[-3000:]}"


def stop(processes: list[subprocess.Popen]) -> None:
    """Kill those of `processes` (started here) still running, with their children."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def summaries(tmp_path_factory) -> dict[str, list[dict]]:
    """Every task's rank summaries (`real_size_worker.run_task`): the one-process runs in two processes side by
    side, the torchrun run of every task as soon as the three shorter ones are done (its ranks wait for the
    avatar's). The stages the one-process runs saved (GBs) are deleted once compared."""
    out = tmp_path_factory.mktemp("real_size")
    worker = ["-m", "tests.parallel.real_size_worker", str(out), str(out / "inputs"), PROFILE]
    logs = [out / "single0.log", out / "single1.log", out / "torchrun.log"]
    processes = [start([sys.executable, *worker, *tasks], log) for tasks, log in zip(ONE_PROCESS, logs)]
    tasks = [*ONE_PROCESS[1], *ONE_PROCESS[0]]
    try:
        finish(processes[1], logs[1])
        processes.append(start(torchrun_command(*worker, *tasks), logs[2]))
        finish(processes[0], logs[0])
        finish(processes[2], logs[2])
    finally:
        stop(processes)
    for task in tasks:
        shutil.rmtree(out / f"{task}_single")
    return {task: [json.loads((out / f"{task}_rank{rank}.json").read_text()) for rank in (0, 1)] for task in tasks}


def check_stages(summary: dict) -> None:
    assert not summary["missing_here"] and not summary["extra_here"], summary
    stages = summary["stages"]
    assert all("max_abs" in row for row in stages.values()), stages  # every stage there, with its shape
    for name, row in stages.items():
        if name.startswith("forward.0.in.") or name.endswith(EXACT_INPUTS):
            assert row["max_abs"] == 0, (name, row)  # noise, references, conditions, embeddings, timesteps
        elif ".in." in name:  # a window's condition latents: through the previous clip's rounding
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
    if "mp4" not in stages:  # rank 0 alone writes (and compares) the mp4
        return
    video = stages["mp4"]  # uint8 levels
    if all(stages[f"decoded.{clip}"]["max_abs"] == 0 for clip in range(clips)):
        assert video["max_abs"] == 0, video
    else:
        assert video["mean_abs"] <= 0.01 and video["max_abs"] <= 8, video


@pytest.mark.slow
@pytest.mark.real_size
@pytest.mark.parametrize("task", list(PROFILES[PROFILE].shapes))
def test_parallel_whole_run_equals_one_process_at_real_size(task, summaries):
    ranks = summaries[task]
    for summary in ranks:
        check_stages(summary)
    assert "mp4" in ranks[0]["stages"]
    first = ranks[0]["stages"]["forward.0.in.hidden_states"]["shape"]
    shape = PROFILES[PROFILE].shapes[task]
    assert first[-2:] == [shape.height // 8, shape.width // 8]  # the real latent grid
    if task == "talking_avatar":  # the keyframe clip and a window, each decoded
        assert sum(name.startswith("decoded.") for name in ranks[0]["stages"]) >= 2
