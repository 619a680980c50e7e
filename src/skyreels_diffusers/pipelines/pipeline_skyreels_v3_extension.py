"""SkyReels-V3 single-shot video extension: continue a video by any number of seconds, chunk by chunk."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils import replace_example_docstring
from transformers import AutoTokenizer, UMT5EncoderModel

from ..loaders.pipeline_folder import StrictPipelineLoadingMixin
from ..models import SkyReelsV3Transformer3DModel
from ..schedulers import SkyReelsV3FlowUniPCScheduler
from ..schedulers.scheduling_flow_unipc import SIGMA_MAX_FP32
from .common import (
    FiniteWatch,
    PipelineInputError,
    SkyReelsV3PipelineMixin,
    SkyReelsV3PipelineOutput,
    SkyReelsV3VideoInputMixin,
    check_common_inputs,
    exact_flow_scheduler,
)
from .video_io import VideoInput, pixels_to_uint8, resize_frames


NUM_CONDITION_FRAMES = 25
CHUNK_SECONDS = 5
#: the longest extension one call makes, in seconds (the model was made for 5-30 s; memory grows with the output)
MAX_DURATION = 60

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
    return [CHUNK_SECONDS] * (duration // CHUNK_SECONDS) + (
        [duration % CHUNK_SECONDS] if duration % CHUNK_SECONDS else []
    )


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


class SkyReelsV3ExtensionPipeline(
    StrictPipelineLoadingMixin,
    DiffusionPipeline,
    WanLoraLoaderMixin,
    SkyReelsV3PipelineMixin,
    SkyReelsV3VideoInputMixin,
):
    r"""
    Single-shot video extension with SkyReels-V3 (14B).

    The last 25 frames of the video are VAE-encoded (7 latent frames, posterior mean) and prepended to the noisy
    latents; condition frames get timestep 0, the new ones the current timestep (one timestep per latent frame). The
    duration is generated in 5-second chunks; each chunk is conditioned on the last 25 frames generated so far. The
    latent count of each chunk follows the original's multiple-of-8 bookkeeping (`chunk_latent_frames`).

    Components: `tokenizer`, `text_encoder` (`UMT5EncoderModel`), `transformer` (`SkyReelsV3Transformer3DModel`,
    extension config), `vae` (`AutoencoderKLWan`), `scheduler` (`SkyReelsV3FlowUniPCScheduler`: UniPC with the
    original's flow sigmas, shift 8).

    Where this deliberately differs from the original (`reproduce_original=True` restores all three):
    * one generator runs through all chunks (the original re-seeded every chunk, so every chunk got the same noise);
    * frames are converted to uint8 by rounding, not truncation (truncation darkens each chunk's conditioning by half
      a level on average, compounding from chunk to chunk);
    * `resize_mode="bilinear"` (antialiased) instead of nearest-neighbour resizing of the input (`"nearest"` gives
      the original's).
    `return_input_video=True` prepends the (resized) input video to the output.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _flow_sigma_max = SIGMA_MAX_FP32

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        transformer: SkyReelsV3Transformer3DModel,
        vae: AutoencoderKLWan,
        scheduler: SkyReelsV3FlowUniPCScheduler,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            transformer=transformer,
            vae=vae,
            scheduler=exact_flow_scheduler(scheduler, self._flow_sigma_max),
        )
        self._set_vae_scale_factors()

    @staticmethod
    def check_duration(duration) -> int:
        """1 to `MAX_DURATION` whole seconds; returns the input frames the pipeline conditions on (25)."""
        if not isinstance(duration, int) or isinstance(duration, bool) or not 1 <= duration <= MAX_DURATION:
            raise PipelineInputError(
                "duration", f"must be an integer number of seconds in [1, {MAX_DURATION}], got {duration!r}."
            )
        return NUM_CONDITION_FRAMES

    @classmethod
    def check_inputs(
        cls,
        video,
        prompt,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        duration: int = 5,
        resolution: str = "720P",
        height: int | None = None,
        width: int | None = None,
        fps: float | None = None,
        num_inference_steps: int = 8,
        guidance_scale: float = 1.0,
        resize_mode: str | None = None,
        output_type: str = "np",
        callback_on_step_end_tensor_inputs=None,
    ) -> None:
        """Validate every argument before any model work (needs no weights: a classmethod)."""
        num_condition_frames = cls.check_duration(duration)
        cls.check_video_inputs(video, resolution, height, width, resize_mode, fps, num_condition_frames)
        check_common_inputs(
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            num_inference_steps,
            guidance_scale,
            output_type,
            callback_on_step_end_tensor_inputs,
            cls._callback_tensor_inputs,
        )

    def denoise_chunk(
        self,
        latents: torch.Tensor,
        condition: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One chunk's denoising loop: condition latents first (timestep 0), then the new latents."""
        frames_c, dtype = condition.shape[2], self.transformer.dtype
        self.scheduler.set_begin_index(0)  # no device-to-host sync to find the step index
        watch = FiniteWatch()
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                timestep = torch.cat(
                    [torch.zeros(frames_c, dtype=t.dtype, device=t.device), t.expand(latents.shape[2])]
                ).expand(latents.shape[0], -1)
                hidden_states = torch.cat([condition, latents], dim=2).to(dtype)
                noise_pred = self.predict_noise(
                    i, prompt_embeds, negative_prompt_embeds, hidden_states=hidden_states, timestep=timestep
                )[:, :, frames_c:]
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                latents, prompt_embeds, negative_prompt_embeds = self.step_callback(
                    i, t, latents, prompt_embeds, negative_prompt_embeds
                )
                watch.update(latents, i)
                progress_bar.update()
        self._current_timestep = None
        watch.check()
        return latents, prompt_embeds, negative_prompt_embeds

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
        sigmas: list[float] | None = None,
        timesteps: list[int] | None = None,
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
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        reproduce_original: bool = False,
    ) -> SkyReelsV3PipelineOutput | tuple:
        r"""
        Extend `video` by `duration` seconds.

        Args:
            video: the video to extend: a path (decoded with PyAV, rotation applied), uint8 frames `[F, H, W, 3]`,
                or a list of PIL images. Needs at least 25 frames.
            prompt: what happens next (or pass `prompt_embeds`).
            negative_prompt: used only when guidance is on (default "").
            duration: seconds to add, 1 to 60 (5-30 s is what the model was made for); generated in 5-second chunks.
            resolution: "480P", "540P" or "720P"; the bucket closest to the input's aspect.
            height, width: explicit output size (multiples of 16), overriding the bucket.
            fps: frame rate the duration is counted in (default 24, the model's; 4 frames per latent frame).
            num_inference_steps: denoising steps per chunk (8).
            sigmas: custom unshifted flow sigmas per chunk (diffusers' semantics); default: the original's schedule.
            timesteps: custom timesteps, for schedulers that accept them.
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
            reproduce_original: the original's conventions: every chunk's noise drawn from the generator's initial
                state (the original re-seeded each chunk), uint8 by truncation, nearest-neighbour input resizing.

        Returns: `SkyReelsV3PipelineOutput` with the new frames (plus the input's with `return_input_video`).

        Examples:
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs, decode the video (before any model work)
        self.check_inputs(
            video,
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            duration,
            resolution,
            height,
            width,
            fps,
            num_inference_steps,
            guidance_scale,
            resize_mode,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        resize_mode = resize_mode or ("nearest" if reproduce_original else "bilinear")
        frames, height, width = self.load_input_video(
            video, NUM_CONDITION_FRAMES, resolution, height, width, whole=return_input_video
        )
        condition_frames = (NUM_CONDITION_FRAMES - 1) // self.vae_scale_factor_temporal + 1
        plan = chunk_latent_frames(duration, condition_frames, int(fps or 24) // self.vae_scale_factor_temporal)
        latents = self.check_chunk_latents(latents, plan)
        self._start_call(guidance_scale, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs)
        device = self._execution_device

        # 2. Encode the prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            self.do_classifier_free_guidance,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        batch_size = prompt_embeds.shape[0]

        # 3. Chunk by chunk: encode the last 25 frames, draw the noise, denoise, decode
        prefixes = [resize_frames(frames[-NUM_CONDITION_FRAMES:], height, width, resize_mode).to(device)] * batch_size
        if reproduce_original and generator is None:
            generator = torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        initial_state = generator.get_state() if reproduce_original else None
        new_frames, chunk_latents = [], []
        for index, num_latents in enumerate(plan):
            if initial_state is not None:
                generator.set_state(initial_state)  # the original seeded a fresh generator for every chunk
            condition = torch.cat([self.encode_video(p).to(device) for p in prefixes])
            shape, given = self.latent_shape(batch_size, num_latents, height, width), latents and latents[index]
            noise = self.prepare_latents(shape, generator, device, given, f"latents[{index}]")
            chunk_timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
            self._num_timesteps = len(chunk_timesteps)
            chunk, prompt_embeds, negative_prompt_embeds = self.denoise_chunk(
                noise, condition, chunk_timesteps, prompt_embeds, negative_prompt_embeds
            )
            chunk_latents.append(chunk)
            if self.interrupt:
                break
            frames_u8, prefixes = self.decode_chunk(condition, chunk, prefixes, truncate=reproduce_original)
            new_frames.append(frames_u8)

        # 4. Output
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

    def decode_chunk(
        self, condition: torch.Tensor, chunk: torch.Tensor, prefixes: list[torch.Tensor], truncate: bool
    ) -> tuple[np.ndarray, list[torch.Tensor]]:
        """Decode the condition and new latents together (the causal VAE needs the condition), keep the new frames as
        uint8, and move each video's last 25 frames (the next chunk's condition) on to the new ones."""
        decoded = self.decode_latents(torch.cat([condition, chunk], dim=2))
        frames = pixels_to_uint8(decoded.permute(0, 2, 3, 4, 1), truncate=truncate)[:, NUM_CONDITION_FRAMES:]
        generated = torch.from_numpy(frames).to(chunk.device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        prefixes = [torch.cat([p, g[None]], dim=2)[:, :, -NUM_CONDITION_FRAMES:] for p, g in zip(prefixes, generated)]
        return frames, prefixes

    @staticmethod
    def check_chunk_latents(latents, plan: list[int]) -> list[torch.Tensor] | None:
        if latents is None:
            return None
        latents = [latents] if isinstance(latents, torch.Tensor) else list(latents)
        if len(latents) != len(plan):
            raise PipelineInputError("latents", f"must hold one tensor per chunk ({len(plan)}), got {len(latents)}.")
        return latents
