"""Whole pipelines against the ORIGINAL SkyReels-V3 pipelines run end to end on tiny random components
(`tests/fixtures/pipelines/`, see its README): the same weights (through our converter), inputs, `prompt_embeds` and
seed, the original's conventions (`reproduce_original=True`), fp32 on the CPU.

Each run checks every stored intermediate that helps localise a regression: the input preprocessing, the noise, the
condition latents the transformer sees, the latents after every step (statistics), the final latents and the uint8
frames (at most one level off, at isolated pixels: float rounding at truncation/rounding boundaries).

The pipeline is driven the way `skyreels-v3 generate --task T --reproduce-original` drives it with the case's
inputs and the original's flags (`front_door.py`), and one run per case feeds both tests of the case: the
pipeline-level comparison (every intermediate) and the front-door one (the arguments the request layer chose and the
frames it would write).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import load_file

from skyreels_diffusers import SkyReelsV3ReferencePipeline, SkyReelsV3ShotSwitchingPipeline
from skyreels_diffusers.app.convert import convert_transformer
from skyreels_diffusers.app.tiny import tiny_components
from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
from skyreels_diffusers.pipelines.pipeline_skyreels_v3_shot_switching import SHOT_NUM_CONDITION_FRAMES_MAP
from skyreels_diffusers.pipelines.video_io import letterbox, load_image, load_video, resize_frames, to_uint8
from tests.helpers import FIXTURES
from tests.pipelines.front_door import RunCache, assert_original_call, front_door_argv, run_front_door


PIPELINES = FIXTURES / "pipelines"
LATENT_RTOL = 1e-5  # fp32 rounding over 8 steps (relative to the tensor's largest value)

pytestmark = pytest.mark.slow


class PipelineCase:
    """One pipeline-level golden case: its case.json, stored tensors and the original's transformer weights."""

    def __init__(self, name: str):
        self.dir = PIPELINES / name
        self.meta = json.loads((self.dir / "case.json").read_text())
        self.tensors = load_file(str(self.dir / "tensors.safetensors"))

    def transformer(self, variant: str, folder: Path) -> SkyReelsV3Transformer3DModel:
        """The original's transformer folder (config + weights in its key names) through our converter."""
        original = folder / "original"
        original.mkdir(parents=True)
        (original / "model.safetensors").write_bytes((self.dir / "transformer.safetensors").read_bytes())
        class_name = self.meta["transformer_class"].rsplit(".", 1)[-1]
        (original / "config.json").write_text(
            json.dumps({"_class_name": class_name, **self.meta["transformer_config"]})
        )
        convert_transformer(original, folder / "converted", variant, dtype=torch.float32)
        return SkyReelsV3Transformer3DModel.from_pretrained(folder / "converted", torch_dtype=torch.float32).eval()

    def stats(self, key: str) -> dict:
        return self.meta["tensors"][key]["stats"]


def golden_vae() -> AutoencoderKLWan:
    meta = json.loads((PIPELINES / "vae" / "vae.json").read_text())
    vae = AutoencoderKLWan(**meta["diffusers_config"]).eval()
    vae.load_state_dict(load_file(str(PIPELINES / "vae" / "vae_diffusers.safetensors")), strict=True)
    return vae


def pipeline(cls, task: str, case: PipelineCase, variant: str, folder: Path):
    components = tiny_components(task)  # tokenizer / text encoder are never called: prompt_embeds are given
    return cls(**{**components, "transformer": case.transformer(variant, folder), "vae": golden_vae()})


class Recorder:
    """Captures what the transformer sees on its first call and the latents after every step."""

    def __init__(self, pipe):
        self.first_call, self.steps = None, []
        pipe.transformer.register_forward_pre_hook(self.pre_hook, with_kwargs=True)

    def pre_hook(self, module, args, kwargs):
        if self.first_call is None:
            self.first_call = {k: v.detach().clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}

    def __call__(self, pipe, step, timestep, tensors):
        self.steps.append(tensors["latents"].detach().clone())
        return {}


def assert_latents_close(ours: torch.Tensor, reference: torch.Tensor, what: str) -> None:
    assert ours.shape == reference.shape, what
    error = (ours.double() - reference.double()).abs().max().item()
    assert error <= LATENT_RTOL * reference.abs().max().item(), (what, error)


def assert_stats_close(ours: torch.Tensor, stats: dict, what: str) -> None:
    ours = ours.double()
    scale = max(abs(stats["min"]), abs(stats["max"]))
    for name, value in (("mean", ours.mean()), ("std", ours.std()), ("min", ours.min()), ("max", ours.max())):
        assert abs(value.item() - stats[name]) <= LATENT_RTOL * scale, (what, name, value.item(), stats[name])


def assert_frames_close(ours: np.ndarray, reference: np.ndarray, what: str) -> None:
    """uint8 frames: equal except a level of 1 at isolated pixels."""
    assert ours.shape == reference.shape and ours.dtype == np.uint8, what
    diff = np.abs(ours.astype(np.int16) - reference.numpy().astype(np.int16))
    assert diff.max() <= 1, (what, int(diff.max()))
    assert (diff > 0).mean() <= 2e-4, (what, float((diff > 0).mean()))


def assert_steps_match(recorder: Recorder, case: PipelineCase) -> None:
    per_step = case.meta["tensors"]["_per_step_latents"]
    assert len(recorder.steps) == len(per_step)
    for i, (ours, stored) in enumerate(zip(recorder.steps, per_step)):
        assert_stats_close(ours.squeeze(0), stored["stats"], f"step {i}")


def front_door_reference_to_video(folder: Path):
    """`--ref-imgs ref_astronaut.png ref_cat.jpg --duration 1 --seed 42 --resolution 480P` (the case's run)."""
    case = PipelineCase("reference_to_video")
    pipe = pipeline(SkyReelsV3ReferencePipeline, "reference_to_video", case, "reference", folder)
    spec = case.meta["spec"]
    argv = front_door_argv(
        "reference_to_video",
        "--ref-imgs",
        *[str(PIPELINES / "inputs" / name) for name in spec["refs"]],
        "--duration",
        str(spec["duration"]),
        "--seed",
        str(spec["seed"]),
        "--resolution",
        spec["resolution"],
    )
    return case, run_front_door(argv, pipe, {"prompt_embeds": case.tensors["prompt_embeds"]}, Recorder(pipe))


def front_door_shot_switching(folder: Path):
    """`--input-video input_video.mp4 --duration 2 --seed 9 --resolution 480P` (the case's run)."""
    case = PipelineCase("shot_switching_extension")
    pipe = pipeline(SkyReelsV3ShotSwitchingPipeline, "shot_switching_extension", case, "extension", folder)
    spec = case.meta["spec"]
    argv = front_door_argv(
        "shot_switching_extension",
        "--input-video",
        str(PIPELINES / "inputs" / spec["video"]),
        "--duration",
        str(spec["duration"]),
        "--seed",
        str(spec["seed"]),
        "--resolution",
        spec["resolution"],
    )
    return case, run_front_door(argv, pipe, {"prompt_embeds": case.tensors["prompt_embeds"]}, Recorder(pipe))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One front-door run per case, shared by its pipeline-level and front-door tests."""
    builders = {
        "reference_to_video": front_door_reference_to_video,
        "shot_switching_extension": front_door_shot_switching,
    }
    return RunCache(lambda task: builders[task](tmp_path_factory.mktemp(task)))


class TestReferenceToVideo:
    """The reference-to-video case (a class: pytest-xdist's `loadscope` gives each case's tests, which share one
    run, their own worker, so that the two cases' runs go in parallel)."""

    def test_reference_to_video_matches_the_original_pipeline(self, runs):
        case, run = runs("reference_to_video")
        pipe, recorder = run.pipe, run.recorder
        refs = [load_image(PIPELINES / "inputs" / name) for name in case.meta["spec"]["refs"]]
        height, width = case.meta["info"]["height_width"]
        for i, ref in enumerate(refs):  # the letterboxed references, exactly
            np.testing.assert_array_equal(
                np.asarray(letterbox(ref, width, height)), case.tensors[f"input.ref{i}_letterboxed"]
            )

        frames = run.video.frames

        assert pipe.scheduler.timesteps.tolist() == case.meta["info"]["timesteps"]
        noise_frames = case.meta["info"]["noise_shape"][2]
        first = recorder.first_call["hidden_states"]  # cat([noise, references], time)
        assert_latents_close(first[:, :, :1], case.tensors["noise.frame0"], "noise")
        assert_latents_close(first[:, :, noise_frames:], case.tensors["condition"], "condition")
        assert_steps_match(recorder, case)
        assert_latents_close(recorder.steps[-1][..., ::2, ::2], case.tensors["final_latents.sub"], "final latents")
        video = to_uint8(frames)  # the original rounded its [0, 1] frames
        assert_frames_close(video[:, ::8, ::8], case.tensors["frames.sub"], "frames")
        assert_frames_close(video[:1], case.tensors["frames.first"], "first frame")
        assert_frames_close(video[-1:], case.tensors["frames.last"], "last frame")

    def test_front_door_reference_to_video_reproduces_the_original(self, runs):
        """`skyreels-v3 generate --task reference_to_video --reproduce-original` with only the case's flags: the
        original's settings reach the pipeline and its frames come out."""
        case, run = runs("reference_to_video")
        assert_original_call(run, "reference_to_video")
        assert run.kwargs["num_frames"] == case.meta["info"]["num_frames"]  # --duration 1 at 24 fps
        assert len(run.recorder.steps) == len(case.meta["tensors"]["_per_step_latents"])
        video = to_uint8(run.video.frames)
        assert_frames_close(video[:, ::8, ::8], case.tensors["frames.sub"], "frames")
        assert_frames_close(video[:1], case.tensors["frames.first"], "first frame")
        assert_frames_close(video[-1:], case.tensors["frames.last"], "last frame")


class TestShotSwitching:
    """The shot-switching case."""

    def test_shot_switching_matches_the_original_pipeline(self, runs):
        case, run = runs("shot_switching_extension")
        pipe, recorder = run.pipe, run.recorder
        spec, chunk = case.meta["spec"], case.meta["info"]["chunks"][0]
        height, width = case.meta["info"]["height_width"]
        video_in, _ = load_video(PIPELINES / "inputs" / spec["video"])
        num_condition = SHOT_NUM_CONDITION_FRAMES_MAP[spec["duration"]]
        prefix = resize_frames(video_in[-num_condition:], height, width, "nearest")[0].permute(1, 2, 3, 0)
        prefix = np.rint(((prefix + 1) * 127.5).numpy()).astype(np.uint8)  # nearest resizing keeps the input's levels
        np.testing.assert_array_equal(prefix[:, ::8, ::8], case.tensors["input.prefix_video_uint8.sub"])
        np.testing.assert_array_equal(prefix[-1:], case.tensors["input.prefix_video_uint8.last"])

        frames = run.video.frames

        assert pipe.scheduler.timesteps.tolist() == [t for t, _ in chunk["timesteps_per_call"]]
        first = recorder.first_call
        assert_latents_close(first["hidden_states"][0, :, :1], case.tensors["noise.frame0"], "noise")
        assert_latents_close(
            first["condition_hidden_states"][..., ::2, ::2], case.tensors["condition_latent.sub"], "condition latents"
        )
        assert_steps_match(recorder, case)
        assert_latents_close(recorder.steps[-1][0][..., ::2, ::2], case.tensors["final_latents.sub"], "final latents")
        video = to_uint8(frames)  # our [0, 1] output holds the truncated levels exactly
        assert len(video) == case.meta["info"]["num_output_frames"]
        assert_frames_close(video[:, ::8, ::8], case.tensors["new_frames.sub"], "frames")
        assert_frames_close(video[:1], case.tensors["new_frames.first"], "first frame")
        assert_frames_close(video[-1:], case.tensors["new_frames.last"], "last frame")

    def test_front_door_shot_switching_reproduces_the_original(self, runs):
        """`skyreels-v3 generate --task shot_switching_extension --reproduce-original` with only the case's flags."""
        case, run = runs("shot_switching_extension")
        assert_original_call(run, "shot_switching_extension")
        assert run.kwargs["duration"] == case.meta["spec"]["duration"] and run.kwargs["resize_mode"] is None
        assert len(run.recorder.steps) == len(case.meta["tensors"]["_per_step_latents"])
        video = to_uint8(run.video.frames)
        assert len(video) == case.meta["info"]["num_output_frames"]
        assert_frames_close(video[:, ::8, ::8], case.tensors["new_frames.sub"], "frames")
        assert_frames_close(video[:1], case.tensors["new_frames.first"], "first frame")
        assert_frames_close(video[-1:], case.tensors["new_frames.last"], "last frame")
