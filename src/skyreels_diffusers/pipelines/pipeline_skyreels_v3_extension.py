"""SkyReels-V3 single-shot video extension: continue a video by any number of seconds, chunk by chunk."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers.utils import replace_example_docstring

from .common import SkyReelsV3PipelineOutput, SkyReelsV3VideoPipelineBase
from .video_io import VideoInput, pixels_to_uint8, resize_frames

NUM_CONDITION_FRAMES = 25
CHUNK_SECONDS = 5

EXAMPLE_DOC_STRING = """
    Examples:
        ```python
        >>> import torch
        >>> from skyreels_diffusers import SkyReelsV3ExtensionPipeline
        >>> from skyreels_diffusers.pipelines.video_io import write_video

        >>> pipe = SkyReelsV3ExtensionPipeline.from_pretrained("path/to/SkyReels-V3-V2V-diffusers/single_shot_extension", torch_dtype=torch.bfloat16)
        >>> pipe.vae.to(torch.float32)
        >>> pipe.enable_model_cpu_offload()
        >>> video = pipe(
        ...     video="input.mp4", prompt="The man keeps walking down the street.", duration=10,
        ...     generator=torch.Generator("cuda").manual_seed(42),
        ... ).frames[0]
        >>> write_video(video, "extended.mp4", fps=24)
        ```
"""


def chunk_seconds(duration: int) -> list[int]:
    """Split a duration into 5-second chunks plus the remainder (12 -> [5, 5, 2])."""
    return [CHUNK_SECONDS] * (duration // CHUNK_SECONDS) + ([duration % CHUNK_SECONDS] if duration % CHUNK_SECONDS else [])


def chunk_latent_frames(
    duration: int, condition_latent_frames: int = 7, latents_per_second: int = 6, multiple: int = 8
) -> list[int]:
    """New latent frames per chunk, as the original plans them: each chunk's `condition + new` latent count is a
    multiple of 8 (for sequence parallelism), rounding up or down around `latents_per_second * seconds` with a
    running credit so the total stays close to the requested duration (5-s chunks: 33, 33, 25, 33, 33, 25, ...)."""
    credit, plan = 0, []
    for seconds in chunk_seconds(duration):
        wanted = latents_per_second * seconds
        remainder = (wanted + condition_latent_frames) % multiple
        if remainder > credit:
            plan.append(wanted - remainder + multiple)
            credit += multiple - remainder
        else:
            plan.append(wanted - remainder)
            credit -= remainder
    return plan


class SkyReelsV3ExtensionPipeline(SkyReelsV3VideoPipelineBase):
    r"""
    Single-shot video extension with SkyReels-V3 (14B).

    The last 25 frames of the video are VAE-encoded (7 latent frames, posterior mean) and prepended to the noisy
    latents; condition frames get timestep 0, the new ones the current timestep (one timestep per latent frame). The
    duration is generated in 5-second chunks; each chunk is conditioned on the last 25 frames generated so far. The
    latent count of each chunk follows the original's multiple-of-8 bookkeeping (`chunk_latent_frames`).

    Components: `tokenizer`, `text_encoder` (`UMT5EncoderModel`), `transformer` (`SkyReelsV3Transformer3DModel`,
    extension config), `vae` (`AutoencoderKLWan`), `scheduler` (`UniPCMultistepScheduler`, flow sigmas, shift 8).

    Where this deliberately differs from the original (`reproduce_original=True` restores all three):
    * one generator runs through all chunks (the original re-seeded every chunk, so every chunk got the same noise);
    * frames are converted to uint8 by rounding, not truncation (truncation darkens each chunk's conditioning by half
      a level on average, compounding from chunk to chunk);
    * `resize_mode="bilinear"` (antialiased) instead of nearest-neighbour resizing of the input (`"nearest"` gives
      the original's).
    `return_input_video=True` prepends the (resized) input video to the output.
    """

    @replace_example_docstring(EXAMPLE_DOC_STRING)
    @torch.no_grad()
    def __call__(
        self,
        video: VideoInput,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        duration: int = 5,
        resolution: str = "720P",
        height: int | None = None,
        width: int | None = None,
        fps: float | None = None,
        num_inference_steps: int = 8,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        latents: list[torch.Tensor] | torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        resize_mode: str | None = None,
        return_input_video: bool = False,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        sigmas: list[float] | None = None,
        timesteps: list[int] | None = None,
        reproduce_original: bool = False,
    ) -> SkyReelsV3PipelineOutput | tuple:
        r"""
        Extend `video` by `duration` seconds.

        Args:
            video: the video to extend: a path (decoded with PyAV, rotation applied), uint8 frames `[F, H, W, 3]`,
                or a list of PIL images. Needs at least 25 frames.
            prompt: what happens next (or pass `prompt_embeds`).
            negative_prompt: used only when guidance is on (default "").
            duration: seconds to add, any positive integer (5-30 s is what the model was made for); generated in
                5-second chunks.
            resolution: "480P", "540P" or "720P"; the bucket closest to the input's aspect.
            height, width: explicit output size (multiples of 16), overriding the bucket.
            fps: frame rate the duration is counted in (default 24, the model's; 4 frames per latent frame).
            num_inference_steps: denoising steps per chunk (8).
            guidance_scale: text guidance (1.0 = off, the original's default).
            generator: draws each chunk's noise, in chunk order.
            latents: initial noise per chunk (a list, or one tensor for a single chunk).
            prompt_embeds, negative_prompt_embeds: precomputed UMT5 embeddings.
            resize_mode: how the input is resized to the bucket: "bilinear", "bicubic", "area", "nearest"; default
                "bilinear" ("nearest" with `reproduce_original`).
            return_input_video: prepend the input video (resized) to the output.
            output_type: "np" (default), "pil", "pt" or "latent" (the chunks' latents, concatenated along time).
            return_dict: return a `SkyReelsV3PipelineOutput` instead of a tuple.
            attention_kwargs: passed to the transformer.
            callback_on_step_end: `fn(pipe, step, timestep, tensors) -> dict` after every step of every chunk
                (`step` restarts at 0 in each chunk).
            callback_on_step_end_tensor_inputs: names from `_callback_tensor_inputs` passed to the callback.
            max_sequence_length: text tokens (512).
            sigmas: custom unshifted flow sigmas per chunk (diffusers' semantics); default: the original's schedule.
            timesteps: custom timesteps, for schedulers that accept them.
            reproduce_original: the original's conventions: every chunk's noise drawn from the generator's initial
                state (the original re-seeded each chunk), uint8 by truncation, nearest-neighbour input resizing.

        Returns: `SkyReelsV3PipelineOutput` with the new frames (plus the input's with `return_input_video`).

        Examples:
        """
        if not isinstance(duration, int) or isinstance(duration, bool) or duration < 1:
            raise ValueError(f"`duration` must be a positive integer number of seconds, got {duration!r}.")
        resize_mode = resize_mode or ("nearest" if reproduce_original else "bilinear")
        frames, height, width, fps = self.load_input_video(
            video, NUM_CONDITION_FRAMES, resolution, height, width, resize_mode, fps
        )
        self._check_common_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_inference_steps, guidance_scale,
            output_type, callback_on_step_end_tensor_inputs,
        )
        condition_latent_frames = (NUM_CONDITION_FRAMES - 1) // self.vae_scale_factor_temporal + 1
        latents_per_second = fps / self.vae_scale_factor_temporal
        if latents_per_second != int(latents_per_second):
            raise ValueError(f"`fps` must be a multiple of {self.vae_scale_factor_temporal}, got {fps}.")
        plan = chunk_latent_frames(duration, condition_latent_frames, int(latents_per_second))
        if latents is not None:
            latents = [latents] if isinstance(latents, torch.Tensor) else list(latents)
            if len(latents) != len(plan):
                raise ValueError(f"`latents` must hold one tensor per chunk ({len(plan)}), got {len(latents)}.")
        callback_on_step_end_tensor_inputs = self._prepare_call(
            guidance_scale, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        device = self._execution_device

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, self.do_classifier_free_guidance, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, max_sequence_length=max_sequence_length, device=device,
        )
        batch_size = prompt_embeds.shape[0]
        state = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        dtype = self.transformer.dtype

        # pixels in [-1, 1] of the last 25 frames; each video of the batch continues from its own frames
        first = resize_frames(frames[-NUM_CONDITION_FRAMES:], height, width, resize_mode).to(device)
        prefixes = [first] * batch_size
        new_frames, chunk_latents = [], []
        if reproduce_original and generator is None:
            generator = torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        initial_state = generator.get_state() if reproduce_original else None
        for index, num_latents in enumerate(plan):
            if initial_state is not None:
                generator.set_state(initial_state)  # the original seeded a fresh generator for every chunk
            condition = torch.cat([self.encode_video(p).to(device) for p in prefixes])
            shape = self.latent_shape(batch_size, num_latents, height, width)
            noise = self.prepare_latents(shape, generator, device, None if latents is None else latents[index],
                                         name=f"latents[{index}]")

            def predict(x: torch.Tensor, t: torch.Tensor, state: dict, condition=condition) -> torch.Tensor:
                frames_c = condition.shape[2]
                timestep = torch.cat(
                    [torch.zeros(frames_c, dtype=t.dtype, device=t.device), t.expand(x.shape[2])]
                ).expand(x.shape[0], -1)
                hidden_states = torch.cat([condition, x], dim=2).to(dtype)

                def branch(name, embeds):
                    out = self.run_transformer(
                        name, state["step_index"], hidden_states=hidden_states, timestep=timestep,
                        encoder_hidden_states=embeds,
                    )
                    return out[:, :, frames_c:].float()

                return self.guided(branch, state)

            chunk = self.denoise(
                noise, predict, num_inference_steps, device, state, callback_on_step_end,
                callback_on_step_end_tensor_inputs, sigmas=sigmas, timesteps=timesteps,
            )
            chunk_latents.append(chunk)
            if self.interrupt:
                break
            decoded = self.decode_latents(torch.cat([condition, chunk], dim=2))
            chunk_frames = pixels_to_uint8(decoded.permute(0, 2, 3, 4, 1), truncate=reproduce_original)
            new_frames.append(chunk_frames[:, NUM_CONDITION_FRAMES:])
            generated = torch.from_numpy(new_frames[-1]).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
            prefixes = [torch.cat([p, g[None]], dim=2)[:, :, -NUM_CONDITION_FRAMES:] for p, g in zip(prefixes, generated)]

        if output_type == "latent":
            output = torch.cat(chunk_latents, dim=2)
        else:
            empty = np.zeros((batch_size, 0, height, width, 3), np.uint8)
            video_frames = np.concatenate(new_frames, axis=1) if new_frames else empty
            output = self.format_output(
                video_frames, frames, height, width, resize_mode, return_input_video, output_type
            )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output,)
        return SkyReelsV3PipelineOutput(frames=output)
