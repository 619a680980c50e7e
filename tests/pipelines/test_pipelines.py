"""The three video pipelines end to end on tiny components (CPU)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch

from skyreels_diffusers import (
    SkyReelsV3ReferencePipeline,
    SkyReelsV3ShotSwitchingPipeline,
)
from skyreels_diffusers.app.tiny import tiny_components, tiny_pipeline
from skyreels_diffusers.pipelines.buckets import ASPECT_RATIO_CONFIG, bucket_size
from skyreels_diffusers.pipelines.pipeline_skyreels_v3_extension import chunk_latent_frames, chunk_seconds
from tests.helpers import random_image, random_video


SMALL = dict(height=32, width=48, num_inference_steps=2)
EXTENSION_TASKS = ("single_shot_extension", "shot_switching_extension")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def call(task, **kwargs):
    pipe = tiny_pipeline(task)
    pipe.set_progress_bar_config(disable=True)
    if task == "reference_to_video":
        args = dict(ref_images=[random_image()], prompt="a cat", num_frames=9)
    else:
        args = dict(video=random_video(), prompt="go on", duration=1 if task == "single_shot_extension" else 2)
    return pipe, pipe(**{**args, **SMALL, "generator": gen(), **kwargs})


# ---------------------------------------------------------------------------------------------- frame counts, sizes
@pytest.mark.parametrize("seconds", [1, 2])
def test_reference_frame_count_is_24_d_plus_1(seconds):
    _, out = call("reference_to_video", num_frames=24 * seconds + 1)
    assert out.frames.shape == (1, 24 * seconds + 1, 32, 48, 3)
    assert out.frames.dtype == np.float32 and 0 <= out.frames.min() and out.frames.max() <= 1


def test_extension_chunk_arithmetic():
    assert chunk_seconds(12) == [5, 5, 2]
    assert chunk_latent_frames(30) == [33, 33, 25, 33, 33, 25]
    for duration in range(1, 31):
        plan = chunk_latent_frames(duration)
        assert all((7 + n) % 8 == 0 for n in plan)
        assert abs(sum(plan) - 6 * duration) <= 7


@pytest.mark.parametrize("duration", [1, pytest.param(6, marks=pytest.mark.slow)])
def test_extension_frame_count_follows_the_chunk_plan(duration):
    _, out = call("single_shot_extension", duration=duration, num_inference_steps=1)
    assert out.frames.shape == (1, 4 * sum(chunk_latent_frames(duration)), 32, 48, 3)


@pytest.mark.parametrize("duration", [2, 3])
def test_shot_switching_frame_count(duration):
    _, out = call("shot_switching_extension", duration=duration)
    assert out.frames.shape == (1, 24 * duration + 1, 32, 48, 3)


def test_return_input_video_prepends_the_input():
    video = random_video(frames=27)
    _, out = call("shot_switching_extension", video=video, return_input_video=True, output_type="np")
    assert out.frames.shape[1] == 27 + 49
    np.testing.assert_allclose(out.frames[0, :27], video / 255.0, atol=1 / 255 + 1e-6)


def test_reference_output_size_from_bucket():
    pipe = tiny_pipeline("reference_to_video")
    pipe.set_progress_bar_config(disable=True)
    image = random_image(90, 160)  # 16:9 landscape -> 480P key 0.56 -> 480x848
    latents = pipe(
        ref_images=[image],
        prompt="x",
        num_frames=1,
        resolution="480P",
        num_inference_steps=1,
        generator=gen(),
        output_type="latent",
    ).frames
    assert (latents.shape[-2] * 8, latents.shape[-1] * 8) == (480, 848) == bucket_size(90, 160, "480P")


def test_bucket_tables_are_floored_to_16():
    assert bucket_size(720, 1280, "720P") == (720, 1280)
    assert bucket_size(1080, 1920, "480P") == (480, 848)
    assert bucket_size(1000, 1000, "540P") == (720, 720)
    for table in ASPECT_RATIO_CONFIG.values():
        for h, w in table.values():
            assert bucket_size(h, w, next(k for k, v in ASPECT_RATIO_CONFIG.items() if v is table))[0] % 16 == 0


# ---------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize(
    "task", ["reference_to_video", *(pytest.param(t, marks=pytest.mark.slow) for t in EXTENSION_TASKS)]
)
def test_deterministic_with_generator(task):
    _, a = call(task)
    _, b = call(task)
    np.testing.assert_array_equal(a.frames, b.frames)
    _, c = call(task, generator=gen(1))
    assert np.abs(a.frames - c.frames).max() > 0


@pytest.mark.parametrize("output_type", ["np", "pt", "pil", "latent"])
def test_output_types(output_type):
    _, out = call("reference_to_video", output_type=output_type)
    frames = out.frames
    if output_type == "np":
        assert frames.shape == (1, 9, 32, 48, 3)
    elif output_type == "pt":
        assert isinstance(frames, torch.Tensor) and frames.shape == (1, 9, 3, 32, 48)
    elif output_type == "pil":
        assert len(frames) == 1 and len(frames[0]) == 9 and isinstance(frames[0][0], PIL.Image.Image)
        assert frames[0][0].size == (48, 32)
    else:
        assert frames.shape == (1, 16, 3, 4, 6)


@pytest.mark.parametrize("task", ["reference_to_video", "shot_switching_extension"])
def test_callback_on_step_end_sees_and_replaces_latents(task):
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append((step, int(timestep), tensors["latents"].shape, tensors["prompt_embeds"].shape))
        return {"latents": torch.zeros_like(tensors["latents"])}

    _, out = call(
        task,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        output_type="latent",
    )
    assert [s[0] for s in seen] == [0, 1]
    assert seen[0][3][1] == 512
    assert torch.count_nonzero(out.frames) == 0  # the last replacement is what comes out


def test_prompt_embeds_instead_of_prompt():
    pipe = tiny_pipeline("reference_to_video")
    pipe.set_progress_bar_config(disable=True)
    embeds, _ = pipe.encode_prompt("a cat", device="cpu")
    assert embeds.shape == (1, 512, 32)
    a = pipe(ref_images=[random_image()], prompt="a cat", num_frames=5, generator=gen(), **SMALL).frames
    b = pipe(ref_images=[random_image()], prompt_embeds=embeds, num_frames=5, generator=gen(), **SMALL).frames
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_prompt_embeddings_are_zero_past_the_prompt():
    pipe = tiny_pipeline("reference_to_video")
    embeds, _ = pipe.encode_prompt("hi", device="cpu")
    length = len(pipe.tokenizer("hi").input_ids)
    assert torch.count_nonzero(embeds[0, length:]) == 0 and torch.count_nonzero(embeds[0, :length]) > 0


def test_guidance_runs_three_branches_for_text_and_image():
    pipe = tiny_pipeline("reference_to_video")
    pipe.set_progress_bar_config(disable=True)
    calls = []
    forward = pipe.transformer.forward

    def counting(*args, **kwargs):
        calls.append(kwargs["hidden_states"][:, :, -4:].abs().sum().item())
        return forward(*args, **kwargs)

    pipe.transformer.forward = counting
    pipe(
        ref_images=[random_image()],
        prompt="a",
        num_frames=5,
        guidance_scale=5.0,
        guidance_scale_img=2.0,
        generator=gen(),
        **{**SMALL, "num_inference_steps": 1},
    )
    assert len(calls) == 3 and calls[2] == 0.0 and calls[0] > 0  # last branch: zero reference latents


def test_save_load_round_trip(tmp_path):
    pipe, out = call("reference_to_video")
    pipe.save_pretrained(tmp_path / "p")
    loaded = SkyReelsV3ReferencePipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    again = loaded(ref_images=[random_image()], prompt="a cat", num_frames=9, generator=gen(), **SMALL)
    np.testing.assert_allclose(again.frames, out.frames, atol=1e-5)


def test_denoising_loop_recomputed_step_by_step():
    """Independent check of the shot-switching loop: rebuild the final latents from the components."""
    components = tiny_components("shot_switching_extension")
    pipe = SkyReelsV3ShotSwitchingPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    video = random_video(frames=12)
    final = pipe(video=video, prompt="cut", duration=2, generator=gen(3), output_type="latent", **SMALL).frames

    # by hand: condition = VAE mean of the last 9 frames (bilinear resize is the identity at this size)
    vae, transformer, scheduler = components["vae"], components["transformer"], components["scheduler"]
    with torch.no_grad():
        pixels = torch.from_numpy(video[-9:]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
        condition = (vae.encode(pixels).latent_dist.mode() - mean) / std
        embeds, _ = pipe.encode_prompt("cut", device="cpu")
        latents = torch.randn((1, 16, 13, 4, 6), generator=gen(3))
        scheduler.set_timesteps(2)
        for t in scheduler.timesteps:
            timestep = torch.tensor([[int(t)] * 13 + [0] * 3])
            pred = transformer(latents, timestep, embeds, condition_hidden_states=condition).sample
            latents = scheduler.step(pred, t, latents).prev_sample
    torch.testing.assert_close(final, latents, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_extension_chunks_continue_from_generated_frames():
    """Chunk 2 is conditioned on chunk 1's last 25 frames: changing chunk 1 (via its noise) changes chunk 2."""
    pipe = tiny_pipeline("single_shot_extension")
    pipe.set_progress_bar_config(disable=True)
    plan = chunk_latent_frames(6)
    noise = [torch.randn(1, 16, n, 4, 6, generator=gen(i)) for i, n in enumerate(plan)]
    video = random_video()
    a = pipe(video=video, prompt="x", duration=6, latents=noise, **{**SMALL, "num_inference_steps": 1}).frames
    noise2 = [noise[0] + 1.0, noise[1]]
    b = pipe(video=video, prompt="x", duration=6, latents=noise2, **{**SMALL, "num_inference_steps": 1}).frames
    first = 4 * plan[0]
    assert np.abs(a[:, :first] - b[:, :first]).max() > 0
    assert np.abs(a[:, first:] - b[:, first:]).max() > 0


# ---------------------------------------------------------------------------------------------- schedules, conventions
@pytest.mark.parametrize(
    "task",
    ["reference_to_video", pytest.param("single_shot_extension", marks=pytest.mark.slow), "shot_switching_extension"],
)
def test_explicit_sigmas_follow_diffusers_semantics(task):
    """The original's unshifted sigmas passed as `sigmas=` give the default video exactly; other sigmas another."""
    from skyreels_diffusers.schedulers.scheduling_flow_unipc import original_flow_sigmas

    pipe, default = call(task, output_type="latent")
    sigmas = original_flow_sigmas(2, pipe.scheduler.config.flow_sigma_max)
    _, explicit = call(task, output_type="latent", sigmas=sigmas)
    _, other = call(task, output_type="latent", sigmas=np.array([0.9, 0.4]))
    torch.testing.assert_close(explicit.frames, default.frames, rtol=0, atol=0)
    assert (other.frames - default.frames).abs().max() > 1e-3
    with pytest.raises(ValueError, match="timestep"):
        call(task, output_type="latent", timesteps=[999, 500])  # UniPC takes no custom timesteps


@pytest.mark.slow
def test_reproduce_original_reseeds_every_extension_chunk():
    """The original drew every chunk's noise from a freshly seeded generator: with `reproduce_original` every chunk
    starts from the same noise, by default the chunks draw one stream in turn."""
    noises = {}

    def first_noise(flag):
        pipe = tiny_pipeline("single_shot_extension")
        pipe.set_progress_bar_config(disable=True)
        seen = []
        pipe.transformer.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["hidden_states"][:, :1, 7:8].clone()), with_kwargs=True
        )
        pipe(
            video=random_video(),
            prompt="go on",
            duration=6,
            generator=gen(),
            reproduce_original=flag,
            **{**SMALL, "num_inference_steps": 1},
        )
        return seen  # one call per chunk: channel 0 of the first new latent frame of its initial noise

    noises = {flag: first_noise(flag) for flag in (False, True)}
    assert len(noises[True]) == len(noises[False]) == 2
    torch.testing.assert_close(noises[True][0], noises[True][1], rtol=0, atol=0)
    assert not torch.equal(noises[False][0], noises[False][1])
    torch.testing.assert_close(noises[False][0], noises[True][0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "task", [pytest.param("single_shot_extension", marks=pytest.mark.slow), "shot_switching_extension"]
)
def test_reproduce_original_truncates_and_resizes_with_nearest_neighbours(task):
    video = random_video(height=45, width=70)  # resized to the 32 x 48 output
    kwargs = dict(video=video, output_type="pt", num_inference_steps=1)
    _, ours = call(task, **kwargs)
    _, original = call(task, **kwargs, reproduce_original=True)
    _, nearest = call(task, **kwargs, resize_mode="nearest")
    levels = lambda frames: (frames * 255).round()  # noqa: E731
    difference = levels(nearest.frames) - levels(original.frames)  # same resizing: only rounding vs truncation
    assert difference.min() >= 0 and difference.max() <= 1 and difference.mean() > 0.1
    assert (levels(ours.frames) - levels(nearest.frames)).abs().max() > 0  # bilinear vs nearest input
