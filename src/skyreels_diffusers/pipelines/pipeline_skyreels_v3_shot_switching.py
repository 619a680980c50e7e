"""SkyReels-V3 shot-switching extension: continue a video after a cinematic cut (2-5 s)."""

from __future__ import annotations

from typing import Any, Callable

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


class SkyReelsV3ShotSwitchingPipeline(
    StrictPipelineLoadingMixin,
    DiffusionPipeline,
    WanLoraLoaderMixin,
    SkyReelsV3PipelineMixin,
    SkyReelsV3VideoInputMixin,
):
    r"""
    Shot-switching video extension with SkyReels-V3 (14B, its own weights): a new shot of 2-5 s after a cut.

    The last 9/17/25/33 frames (for 2/3/4/5 s) are VAE-encoded (posterior mean) and passed as
    `condition_hidden_states`: patch-embedded separately, appended after the noisy tokens with RoPE temporal
    positions from 1024 on, timestep 0. Prompts may start with a cut tag such as `[ZOOM_IN_CUT]`,
    `[ZOOM_OUT_CUT]`.

    Components as the single-shot pipeline (`scheduler`: `SkyReelsV3FlowUniPCScheduler`, shift 8).

    Differences from the original: it runs on one GPU without `--offload` (the original moved the transformer to the
    CPU before denoising and crashed), frames are rounded (not truncated) to uint8, `resize_mode="bilinear"` by
    default (`"nearest"` = the original), `return_input_video=True` prepends the input. `reproduce_original=True`
    truncates and resizes with nearest neighbours as the original did.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _flow_sigma_max = SIGMA_MAX_FP32

    # Copied from skyreels_diffusers.pipelines.pipeline_skyreels_v3_extension.SkyReelsV3ExtensionPipeline.__init__
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
        """2, 3, 4 or 5 seconds; returns the input frames the pipeline conditions on (9, 17, 25 or 33)."""
        if isinstance(duration, bool) or duration not in SHOT_NUM_CONDITION_FRAMES_MAP:
            raise PipelineInputError(
                "duration", f"must be one of {sorted(SHOT_NUM_CONDITION_FRAMES_MAP)} seconds, got {duration!r}."
            )
        return SHOT_NUM_CONDITION_FRAMES_MAP[duration]

    @classmethod
    # Copied from skyreels_diffusers.pipelines.pipeline_skyreels_v3_extension.SkyReelsV3ExtensionPipeline.check_inputs
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
        latents: torch.Tensor | None = None,
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
        Generate `duration` seconds after a cut from the end of `video`.

        Args:
            video: the video before the cut (path, uint8 `[F, H, W, 3]` frames or PIL list), at least as many frames
                as the duration's condition frames (9/17/25/33).
            prompt: the new shot, optionally starting with a cut tag (or pass `prompt_embeds`).
            negative_prompt: used only when guidance is on.
            duration: 2, 3, 4 or 5 seconds; `fps * duration + 1` frames are generated.
            resolution, height, width, fps, resize_mode, return_input_video: as in `SkyReelsV3ExtensionPipeline`.
            num_inference_steps: denoising steps (8).
            sigmas: custom unshifted flow sigmas (diffusers' semantics); default: the original's schedule.
            timesteps: custom timesteps, for schedulers that accept them.
            guidance_scale: text guidance (1.0 = off).
            generator: draws the noise.
            latents: initial noise `[1, 16, fps*duration/4+1, H/8, W/8]`.
            prompt_embeds, negative_prompt_embeds: precomputed UMT5 embeddings.
            output_type: "np" (default), "pil", "pt" or "latent".
            return_dict, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
            max_sequence_length: as in the other pipelines.
            reproduce_original: the original's conventions (uint8 by truncation, nearest-neighbour input resizing;
                `resize_mode` defaults to "nearest").

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
        num_condition_frames = SHOT_NUM_CONDITION_FRAMES_MAP[duration]
        frames, height, width = self.load_input_video(
            video, num_condition_frames, resolution, height, width, whole=return_input_video
        )
        num_latents = int(fps or 24) * duration // self.vae_scale_factor_temporal + 1
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

        # 3. Condition latents (the last frames before the cut) and noise
        pixels = resize_frames(frames[-num_condition_frames:], height, width, resize_mode).to(device)
        condition = self.encode_video(pixels).to(device).expand(batch_size, -1, -1, -1, -1)
        latents = self.prepare_latents(
            self.latent_shape(batch_size, num_latents, height, width), generator, device, latents
        )

        # 4. Timesteps
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps=timesteps, sigmas=sigmas
        )
        self._num_timesteps = len(timesteps)

        # 5. Denoising loop
        latents = self.denoise(
            latents,
            condition,
            timesteps,
            prompt_embeds,
            negative_prompt_embeds,
        )

        # 6. Decode
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

    def denoise(
        self,
        latents: torch.Tensor,
        condition: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """The denoising loop: noisy tokens first, then the condition tokens at timestep 0 (the model's order)."""
        dtype = self.transformer.dtype
        condition_input = condition.to(dtype)
        self.scheduler.set_begin_index(0)  # no device-to-host sync to find the step index
        watch = FiniteWatch()
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                timestep = torch.cat(
                    [t.expand(latents.shape[2]), torch.zeros(condition.shape[2], dtype=t.dtype, device=t.device)]
                ).expand(latents.shape[0], -1)
                noise_pred = self.predict_noise(
                    i,
                    prompt_embeds,
                    negative_prompt_embeds,
                    hidden_states=latents.to(dtype),
                    timestep=timestep,
                    condition_hidden_states=condition_input,
                )
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                latents, prompt_embeds, negative_prompt_embeds = self.step_callback(
                    i, t, latents, prompt_embeds, negative_prompt_embeds
                )
                watch.update(latents, i)
                progress_bar.update()
        self._current_timestep = None
        watch.check()
        return latents
