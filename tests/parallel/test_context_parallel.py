"""Two gloo processes with Ulysses sequence parallelism give the single-process output (fp32, rel. error <= 1e-6)
for every transformer variant (reference, per-frame extension, appended condition tokens, avatar audio attention
across a shard boundary) and for a pipeline end to end.

Token counts that do not divide by the degree use diffusers' `ulysses_anything`, whose uneven all-gather NCCL
supports and gloo does not ("ProcessGroupGloo::allgather: invalid tensor size"): that case is GPU-only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from skyreels_diffusers.parallel.context_parallel import check_degrees
from tests.helpers import torchrun_command


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "tests.parallel.cp_worker", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = torchrun_command("-m", "tests.parallel.cp_worker", str(out))
    parallel = subprocess.run(torchrun, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    return {name: torch.load(out / f"out_{name}.pt", weights_only=True) for name in ("single", 0, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["reference", "extension", "shot_switching", "avatar", "pipeline"])
def test_two_processes_equal_one(outputs, case):
    reference = outputs["single"][case]
    for rank in (0, 1):
        out = outputs[rank][case]
        assert out.shape == reference.shape
        rel = ((out.double() - reference.double()).norm() / reference.double().norm()).item()
        assert rel <= 1e-6, (case, rank, rel)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["reference", "extension", "shot_switching", "avatar"])
def test_usp_processor_swap_equals_one_process(outputs, case):
    """The xfuser path (`enable_usp`: `_cp_plan` hooks + `SkyReelsV3USPAttnProcessor`) with yunchang's Ulysses
    attention: the same output as one process, each rank holding half of the tokens."""
    reference = outputs["single"][case]
    full = int(outputs["single"][f"{case}.tokens_in_last_block"])
    for rank in (0, 1):
        out = outputs[rank][f"usp.{case}"]
        rel = ((out.double() - reference.double()).norm() / reference.double().norm()).item()
        assert rel <= 1e-6, (case, rank, rel)
        assert int(outputs[rank][f"usp.{case}.tokens_in_last_block"]) == full // 2


@pytest.mark.slow
def test_usp_uneven_token_count_is_a_clear_error(outputs):
    for rank in (0, 1):
        message = outputs[rank]["usp.uneven_error"]
        assert "45 tokens cannot be split evenly over 2" in message, message


@pytest.mark.slow
@pytest.mark.parametrize("case", ["reference", "extension", "shot_switching", "avatar"])
def test_each_rank_holds_half_of_the_tokens(outputs, case):
    full = int(outputs["single"][f"{case}.tokens_in_last_block"])
    assert [int(outputs[r][f"{case}.tokens_in_last_block"]) for r in (0, 1)] == [full // 2, full - full // 2]


def test_degree_errors():
    with pytest.raises(ValueError, match="must divide the 40 attention heads"):
        check_degrees(40, 3, 1, 3)
    with pytest.raises(ValueError, match="must equal the number of processes"):
        check_degrees(40, 2, 1, 4)
    check_degrees(40, 4, 1, 4)


def torchrun(args, tmp_path, nproc=2):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = torchrun_command("-m", "skyreels_diffusers.app.cli", "generate", *args, nproc=nproc)
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_torchrun_cli_matches_one_process(tmp_path):
    args = [
        "--task",
        "shot_switching_extension",
        "--model",
        "tiny",
        "--duration",
        "2",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "48",
        "--crf",
        "0",
    ]
    single = tmp_path / "single.mp4"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # the thread count torchrun gives workers
    one = subprocess.run(
        [sys.executable, "-m", "skyreels_diffusers.app.cli", "generate", *args, "--output", str(single)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    result = torchrun([*args, "--ulysses-degree", "2", "--output", str(tmp_path / "two.mp4")], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "two.mp4")  # printed once, by rank 0
    assert result.stdout.count("two.mp4") == 1
    import av
    import numpy as np

    def frames(path):
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])

    # sharded and single runs agree to float rounding (<= 1e-6, see above), which flips a handful of uint8 values
    # by one level; lossless H.264 (4:2:0) keeps those flips local (a different seed differs everywhere)
    difference = np.abs(frames(tmp_path / "two.mp4").astype(int) - frames(single).astype(int))
    assert difference.max() <= 2 and (difference > 0).mean() < 1e-3


@pytest.mark.slow
def test_torchrun_cli_rejects_bad_degrees(tmp_path):
    result = torchrun(
        [
            "--task",
            "reference_to_video",
            "--model",
            "tiny",
            "--ulysses-degree",
            "3",
            "--output",
            str(tmp_path / "x.mp4"),
        ],
        tmp_path,
    )
    assert result.returncode != 0
    assert "--ulysses-degree" in result.stderr and "attention heads" in result.stderr
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.slow
def test_8bit_backend_under_ulysses_equals_one_process(tmp_path):
    """The `triton_8bit` backend is registered as supporting context parallelism: under Ulysses over 2 gloo
    processes (Triton's interpreter) each rank's kernel gets the full sequence of its heads, so the sharded output
    is the single process's (the same quantisation of the same full-sequence tensors)."""
    pytest.importorskip("triton")
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
        "OMP_NUM_THREADS": "1",
        "TRITON_INTERPRET": "1",
    }
    worker = ["-m", "tests.parallel.attn8_worker", str(tmp_path)]
    single = subprocess.run([sys.executable, *worker], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = torchrun_command(*worker)
    parallel = subprocess.run(torchrun, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"attn8_{name}.pt", weights_only=True).float() for name in ("single", 0))
    assert one.shape == two.shape and torch.isfinite(two).all()
    assert ((two - one).norm() / one.norm()).item() < 1e-2


def test_ring_on_the_default_attention_backend_is_refused_before_loading(monkeypatch):
    """Ring attention needs the kernels' log-sum-exp: on the default backend (native SDPA, which returns none) the
    request is refused naming --ring-degree and the backends that work; with one of them, or xfuser, it passes."""
    from skyreels_diffusers.app.request import GenerationRequest, check_parallel

    request = GenerationRequest(task="reference_to_video", ulysses_degree=2, ring_degree=2)
    with pytest.raises(ValueError, match="--ring-degree: .*log-sum-exp.*--attention-backend _native_cudnn"):
        check_parallel(request, 4)
    check_parallel(GenerationRequest(task="reference_to_video", ulysses_degree=2), 2)
    check_parallel(
        GenerationRequest(
            task="reference_to_video", ulysses_degree=2, ring_degree=2, attention_backend="_native_cudnn"
        ),
        4,
    )
    check_parallel(
        GenerationRequest(task="reference_to_video", ulysses_degree=2, ring_degree=2, parallel_backend="xfuser"), 4
    )
