"""Whole runs across processes, on CPU over gloo with 2 processes: the parallel VAE equals diffusers'
one-rank tiled VAE exactly, encoders once give every rank the embeddings the pipeline computes itself (and rank 1
loads no text or audio encoder), FSDP2 weight sharding gives the unsharded output (fp32 and bf16, rel. <= 1e-6),
and the CLI under torchrun with `--shard-weights` gives the one-process video."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from skyreels_diffusers.app.request import GenerationRequest, validate
from skyreels_diffusers.parallel.sharding import sharding_plan
from tests.helpers import tiny_transformer, torchrun_command


ROOT = Path(__file__).resolve().parents[2]
# this checkout's package first (the worker processes do not inherit pytest's sys.path)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    command = torchrun_command("-m", "tests.parallel.whole_run_worker", str(out))
    done = subprocess.run(command, check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(out / f"whole_{rank}.pt", weights_only=True) for rank in (0, 1)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["decode", "encode"])
def test_parallel_vae_equals_one_rank_tiled(ranks, kind):
    reference = ranks[0][f"vae.{kind}.one_rank"]
    assert reference.shape == ((1, 3, 9, 112, 176) if kind == "decode" else (1, 16, 2, 13, 19))
    for outputs in ranks:
        assert torch.equal(outputs[f"vae.{kind}.one_rank"], reference)  # every rank's own one-rank result
        assert torch.equal(outputs[f"vae.{kind}.parallel"], reference)  # bit for bit
        assert bool(outputs["vae.shares_weights"])


TASKS = ("reference_to_video", "talking_avatar")


@pytest.mark.slow
def test_encoders_once_only_rank_0_loads_the_text_and_audio_encoders(ranks):
    for task in TASKS:
        assert [bool(r[f"{task}.has_text_encoder"]) for r in ranks] == [True, False]
    assert [bool(r["talking_avatar.has_audio_encoder"]) for r in ranks] == [True, False]


def own_embeddings(task: str) -> dict:
    """What the tiny pipeline computes itself, in this process, through its own encoder calls."""
    from skyreels_diffusers.app.tiny import tiny_pipeline

    pipe = tiny_pipeline(task, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: CPU reductions depend on the thread count
    try:
        return _encode(pipe, task)
    finally:
        torch.set_num_threads(threads)


def _encode(pipe, task: str) -> dict:
    from skyreels_diffusers.pipelines.audio_io import load_speech
    from skyreels_diffusers.pipelines.pipeline_skyreels_v3_talking_avatar import NEGATIVE_PROMPT
    from tests.parallel.whole_run_worker import portrait, waveform

    with torch.no_grad():
        if task != "talking_avatar":
            prompt, negative = pipe.encode_prompt("a dog runs", None, True)
            return {"prompt_embeds": prompt, "negative_prompt_embeds": negative}
        prompt, negative = pipe.encode_prompt("a dog runs", NEGATIVE_PROMPT, True)
        pixels = pipe.prepare_portrait(portrait(), 32, 48)[0, :, 0]
        return {
            "prompt_embeds": prompt,
            "negative_prompt_embeds": negative,
            "window_prompt_embeds": pipe.encode_prompt("a person is talking")[0],
            "image_embeds": pipe.encode_image(pixels[None]),
            "audio_embeds": pipe.encode_audio(load_speech(waveform(), 16000)),
        }


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_encoders_once_every_rank_gets_the_pipelines_own_embeddings(ranks, task):
    expected = own_embeddings(task)
    for outputs in ranks:
        received = {
            k.split(".", 1)[1]: v
            for k, v in outputs.items()
            if k.startswith(f"{task}.") and not k.split(".", 1)[1].startswith("has_")
        }
        assert set(received) == set(expected)
        for name, value in expected.items():
            assert received[name].dtype == value.dtype and torch.equal(received[name], value), (task, name)


@pytest.mark.slow
def test_pipeline_with_received_embeddings_equals_its_own_encoding(ranks):
    """Rank 1 (no text encoder) passes the broadcast embeddings; the video equals the one from the prompt."""
    from skyreels_diffusers.app.tiny import tiny_pipeline
    from tests.parallel.whole_run_worker import portrait

    pipe = tiny_pipeline("reference_to_video", seed=0)
    pipe.set_progress_bar_config(disable=True)
    common = {
        "ref_images": [portrait()],
        "num_frames": 5,
        "height": 32,
        "width": 48,
        "num_inference_steps": 2,
        "guidance_scale": 3.0,
        "output_type": "pt",
    }
    own = pipe(prompt="a dog runs", generator=torch.Generator().manual_seed(0), **common).frames
    received = {name: ranks[1][f"reference_to_video.{name}"] for name in ("prompt_embeds", "negative_prompt_embeds")}
    given = pipe(generator=torch.Generator().manual_seed(0), **received, **common).frames
    assert torch.equal(own, given)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["reference", "extension", "avatar", "avatar_bf16"])
def test_weight_sharding_equals_unsharded(ranks, case):
    """FSDP2 per block (reference: sharding alone; extension and avatar: with Ulysses over the same 2 ranks;
    avatar_bf16: bf16 weights with fp32 norms/modulation, the time embedding as fp32 units of their own)."""
    for outputs in ranks:
        assert relative(outputs[f"{case}.sharded"], outputs[f"{case}.unsharded"]) <= 1e-6
    if case == "avatar_bf16":
        assert [int(r["avatar_bf16.fp32_units"]) for r in ranks] == [2, 2]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["reference", "avatar"])
def test_each_rank_holds_its_shard_of_the_weights(ranks, variant):
    """Local parameter bytes per rank as the plan computes them: together the whole model, each about half."""
    plan = sharding_plan(tiny_transformer(variant), 2)
    held = [int(r[f"{variant}.local_bytes"]) for r in ranks]
    assert held == plan["per_rank_bytes"]
    assert sum(held) == plan["total_bytes"]
    assert max(held) <= plan["total_bytes"] / 2 * 1.05


@pytest.mark.slow
def test_meta_built_model_shards_and_runs(ranks):
    """Built on the meta device in bf16 (fp32 norms kept whole), sharded, materialised: each rank holds part of the
    weights and the forward gives a finite output of the right shape."""
    for outputs in ranks:
        assert outputs["meta.output"].shape == (1, 16, 3, 4, 6) and torch.isfinite(outputs["meta.output"]).all()
    whole = tiny_transformer("avatar").to(torch.bfloat16)
    keep = set(whole._keep_in_fp32_modules)
    total = sum(p.numel() * (4 if keep & set(n.split(".")) else 2) for n, p in whole.named_parameters())
    for outputs in ranks:
        assert total * 0.4 < int(outputs["meta.local_bytes"]) < total * 0.6


def test_sharding_plan_of_the_real_models():
    """Per-rank weight bytes of the 14B transformer (bf16, fp32 `_keep_in_fp32_modules`, as loaded) over 1, 2
    and 4 ranks, from its config on the meta device: what `--shard-weights` leaves per GPU at rest (plus one or two
    all-gathered blocks in flight)."""
    from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
    from skyreels_diffusers.models.configs import TRANSFORMER_CONFIGS

    with torch.device("meta"):
        model = SkyReelsV3Transformer3DModel(**TRANSFORMER_CONFIGS["reference"]).to(torch.bfloat16)
    keep = set(model._keep_in_fp32_modules)
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()
    one, two, four = (sharding_plan(model, world) for world in (1, 2, 4))
    total = one["total_bytes"]
    assert one["per_rank_bytes"] == [total]
    assert 28.5e9 < total < 29.5e9  # 14.3B parameters, mostly bf16
    assert one["units"] == 40 + 2 + 1  # blocks, the fp32 time embedding and projection, the root
    assert 0 < one["whole_bytes"] < 20e6  # norm weights and modulation tables stay whole
    for plan, world in ((two, 2), (four, 4)):
        assert len(plan["per_rank_bytes"]) == world
        assert max(plan["per_rank_bytes"]) <= total / world + plan["whole_bytes"] + 1e6
    assert four["per_rank_bytes"][0] < 7.3e9  # 27 GiB of weights -> under 7 GB per GPU on 4
    assert 0.6e9 < four["largest_block_bytes"] < 0.75e9


@pytest.mark.parametrize(
    "flags, message",
    [
        ({}, "run under torchrun with 2 or more processes"),
        ({"low_vram": True}, "cannot be combined with --low-vram"),
        ({"quantize": "fp8_weight_only"}, "cannot be combined with --quantize"),
    ],
)
def test_shard_weights_errors_name_the_flag(monkeypatch, flags, message):
    monkeypatch.setenv("WORLD_SIZE", "1" if not flags else "2")
    request = GenerationRequest(task="reference_to_video", shard_weights=True, **flags)
    with pytest.raises(ValueError, match=f"--shard-weights: .*{message}"):
        validate(request)


@pytest.mark.slow
def test_torchrun_cli_with_shard_weights_matches_one_process(tmp_path):
    """The avatar end to end (encoders once with audio features, parallel VAE, Ulysses + FSDP2 over 2 processes):
    the one-process video, and the audio track muxed by rank 0."""
    import av

    args = [
        "--task",
        "talking_avatar",
        "--model",
        "tiny",
        "--steps",
        "1",
        "--height",
        "32",
        "--width",
        "48",
        "--crf",
        "0",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "skyreels_diffusers.app.cli", "generate", *args, "--output", str(tmp_path / "one.mp4")],
        check=False,
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        torchrun_command(
            "-m",
            "skyreels_diffusers.app.cli",
            "generate",
            *args,
            "--ulysses-degree",
            "2",
            "--shard-weights",
            "--output",
            str(tmp_path / "two.mp4"),
        ),
        check=False,
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-3000:]

    def read(path):
        with av.open(str(path)) as container:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
            return frames, len(container.streams.audio)

    (single, single_audio), (sharded, sharded_audio) = read(tmp_path / "one.mp4"), read(tmp_path / "two.mp4")
    assert single.shape == sharded.shape and single_audio == sharded_audio == 1
    difference = np.abs(sharded.astype(int) - single.astype(int))
    assert difference.max() <= 2 and (difference > 0).mean() < 1e-3


@pytest.mark.parametrize("task", TASKS)
def test_task_embeddings_are_the_pipelines_own_with_autograd_on(task):
    """`run.run` asks for the embeddings outside `torch.no_grad()`: they must still be the ones the pipeline
    computes inside its call, bit for bit (autograd picks other kernels: 7e-7 apart before), and carry no graph."""
    from skyreels_diffusers.app.distributed import task_embeddings
    from skyreels_diffusers.app.tiny import tiny_pipeline
    from tests.parallel.whole_run_worker import embedding_kwargs

    pipe = tiny_pipeline(task, seed=0)
    expected = _encode(pipe, task)  # inside no_grad, as the pipeline's call
    with torch.enable_grad():
        received = task_embeddings(pipe, task, **embedding_kwargs(task))
    assert set(received) == set(expected)
    for name, value in expected.items():
        assert not received[name].requires_grad, name
        assert torch.equal(received[name], value), (task, name)
