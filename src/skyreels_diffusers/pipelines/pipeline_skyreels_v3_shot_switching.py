"""SkyReels-V3 shot-switching extension: continue a video after a cinematic cut (2-5 s)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.utils import replace_example_docstring

from .common import SkyReelsV3PipelineOutput, SkyReelsV3VideoPipelineBase
from .video_io import VideoInput, pixels_to_uint8

#: seconds after the cut -> condition frames taken from the end of the input video
SHOT_NUM_CONDITION_FRAMES_MAP = {2: 9, 3: 17, 4: 25, 5: 33}

EXAMPLE_DOC_STRING = """
    Examples:
        ```python
        >>> import torch
        >>> from skyreels_diffusers import SkyReelsV3ShotSwitchingPipeline
        >>> from skyreels_diffusers.pipelines.video_io import write_video

        >>> pipe = SkyReelsV3ShotSwitchingPipeline.from_pretrained("path/to/SkyReels-V3-V2V-diffusers/shot_switching_extension", torch_dtype=torch.bfloat16)
        >>> pipe.vae.to(torch.float32)
        >>> pipe.enable_model_cpu_offload()
        >>> video = pipe(
        ...     video="input.mp4", prompt="[ZOOM_IN_CUT] Close-up of the man's face as he smiles.", duration=5,
        ...     generator=torch.Generator("cuda").manual_seed(42),
        ... ).frames[0]
        >>> write_video(video, "cut.mp4", fps=24)
        ```
"""


class SkyReelsV3ShotSwitchingPipeline(SkyReelsV3VideoPipelineBase):
    r"""
    Shot-switching video extension with SkyReels-V3 (14B, its own weights): a new shot of 2-5 s after a cut.

    The last 9/17/25/33 frames (for 2/3/4/5 s) are VAE-encoded (posterior mean) and passed as
    `condition_hidden_states`: patch-embedded separately, appended after the noisy tokens with RoPE temporal
    positions from 1024 on, timestep 0. Prompts may start with a cut tag such as `[ZOOM_IN_CUT]`,
    `[ZOOM_OUT_CUT]`.

    Components as the single-shot pipeline (`scheduler`: UniPC flow sigmas, shift 8).

    Differences from the original: it runs on one GPU without `--offload` (the original moved the transformer to the
    CPU before denoising and crashed), frames are rounded (not truncated) to uint8, `resize_mode="bilinear"` by
    default (`"nearest"` = the original), `return_input_video=True` prepends the input. `reproduce_original=True`
    truncates and resizes with nearest neighbours as the original did.
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
        latents: torch.Tensor | None = None,
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
        Generate `duration` seconds after a cut from the end of `video`.

        Args:
            video: the video before the cut (path, uint8 `[F, H, W, 3]` frames or PIL list), at least as many frames
                as the duration's condition frames (9/17/25/33).
            prompt: the new shot, optionally starting with a cut tag (or pass `prompt_embeds`).
            negative_prompt: used only when guidance is on.
            duration: 2, 3, 4 or 5 seconds; `fps * duration + 1` frames are generated.
            resolution, height, width, fps, resize_mode, return_input_video: as in `SkyReelsV3ExtensionPipeline`.
            num_inference_steps: denoising steps (8).
            guidance_scale: text guidance (1.0 = off).
            generator: draws the noise.
            latents: initial noise `[1, 16, fps*duration/4+1, H/8, W/8]`.
            prompt_embeds, negative_prompt_embeds: precomputed UMT5 embeddings.
            output_type: "np" (default), "pil", "pt" or "latent".
            return_dict, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
            max_sequence_length: as in the other pipelines.
            sigmas: custom unshifted flow sigmas (diffusers' semantics); default: the original's schedule.
            timesteps: custom timesteps, for schedulers that accept them.
            reproduce_original: the original's conventions (uint8 by truncation, nearest-neighbour input resizing;
                `resize_mode` defaults to "nearest").

        Examples:
        """
        if duration not in SHOT_NUM_CONDITION_FRAMES_MAP:
            raise ValueError(f"`duration` must be one of {sorted(SHOT_NUM_CONDITION_FRAMES_MAP)} seconds, got {duration!r}.")
        num_condition_frames = SHOT_NUM_CONDITION_FRAMES_MAP[duration]
        resize_mode = resize_mode or ("nearest" if reproduce_original else "bilinear")
        frames, height, width, fps = self.load_input_video(
            video, num_condition_frames, resolution, height, width, resize_mode, fps
        )
        self._check_common_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_inference_steps, guidance_scale,
            output_type, callback_on_step_end_tensor_inputs,
        )
        num_new_frames = fps * duration
        if num_new_frames != int(num_new_frames) or int(num_new_frames) % self.vae_scale_factor_temporal:
            raise ValueError(f"`fps * duration` must be a multiple of {self.vae_scale_factor_temporal}, got {num_new_frames}.")
        num_latents = int(num_new_frames) // self.vae_scale_factor_temporal + 1
        callback_on_step_end_tensor_inputs = self._prepare_call(
            guidance_scale, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        device = self._execution_device

        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, self.do_classifier_free_guidance, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, max_sequence_length=max_sequence_length, device=device,
        )
        batch_size = prompt_embeds.shape[0]
        condition = self.condition_latents(frames[-num_condition_frames:], height, width, resize_mode, device)
        condition = condition.expand(batch_size, -1, -1, -1, -1)
        latents = self.prepare_latents(
            self.latent_shape(batch_size, num_latents, height, width), generator, device, latents
        )
        dtype = self.transformer.dtype
        condition_input = condition.to(dtype)

        def predict(x: torch.Tensor, t: torch.Tensor, state: dict) -> torch.Tensor:
            # noisy frames first, then the condition frames at timestep 0 (the token order of the model)
            timestep = torch.cat(
                [t.expand(x.shape[2]), torch.zeros(condition.shape[2], dtype=t.dtype, device=t.device)]
            ).expand(x.shape[0], -1)

            def branch(name, embeds):
                return self.run_transformer(
                    name, state["step_index"], hidden_states=x.to(dtype), timestep=timestep,
                    encoder_hidden_states=embeds, condition_hidden_states=condition_input,
                ).float()

            return self.guided(branch, state)

        state = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        latents = self.denoise(
            latents, predict, num_inference_steps, device, state, callback_on_step_end,
            callback_on_step_end_tensor_inputs, sigmas=sigmas, timesteps=timesteps,
        )

        if output_type == "latent":
            output = latents
        else:
            decoded = self.decode_latents(latents)
            video_frames = pixels_to_uint8(decoded.permute(0, 2, 3, 4, 1), truncate=reproduce_original)
            output = self.format_output(
                video_frames, frames, height, width, resize_mode, return_input_video, output_type
            )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output,)
        return SkyReelsV3PipelineOutput(frames=output)
