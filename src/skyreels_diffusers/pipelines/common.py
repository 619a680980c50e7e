"""What the SkyReels-V3 pipelines share: a mixin of helpers (prompt encoding, VAE latent (de)normalisation, noise,
output formatting, the common input checks) and the output dataclass. Each pipeline registers its own components
and runs its own denoising loop."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from ..schedulers import SkyReelsV3FlowUniPCScheduler
from .buckets import check_size
from .errors import PipelineInputError


logger = logging.get_logger(__name__)

#: the most denoising steps any pipeline accepts (the checkpoints are distilled for 4-8)
MAX_INFERENCE_STEPS = 100
OUTPUT_TYPES = ("np", "pil", "pt", "latent")


@dataclass
class SkyReelsV3PipelineOutput(BaseOutput):
    """Output of the SkyReels-V3 pipelines.

    Args:
        frames: the generated videos: `np.ndarray` `[B, F, H, W, 3]` floats in [0, 1] (`output_type="np"`), a
            tensor `[B, F, 3, H, W]` (`"pt"`), a list of lists of PIL images (`"pil"`) or the latents (`"latent"`).
    """

    frames: Any


def exact_flow_scheduler(scheduler, flow_sigma_max: float):
    """A stock `UniPCMultistepScheduler` with flow sigmas (what folders converted before the exact schedule hold)
    -> `SkyReelsV3FlowUniPCScheduler` with the same config and the task's original sigma spacing; anything else is
    returned as it is."""
    if type(scheduler) is UniPCMultistepScheduler and scheduler.config.use_flow_sigmas:
        logger.info(
            "Using the original SkyReels-V3 flow-sigma spacing (SkyReelsV3FlowUniPCScheduler) for the "
            "UniPCMultistepScheduler of this pipeline; pass `sigmas=` for another spacing."
        )
        return SkyReelsV3FlowUniPCScheduler.from_config(scheduler.config, flow_sigma_max=flow_sigma_max)
    return scheduler


def check_common_inputs(
    prompt,
    negative_prompt,
    prompt_embeds,
    negative_prompt_embeds,
    num_inference_steps,
    guidance_scale,
    output_type,
    callback_on_step_end_tensor_inputs,
    callback_tensor_inputs,
    output_types=OUTPUT_TYPES,
) -> None:
    """The checks every pipeline makes on its text, step, guidance and output arguments (no weights needed)."""
    if prompt is None and prompt_embeds is None:
        raise PipelineInputError("prompt", "or `prompt_embeds` is required.")
    if prompt is not None and prompt_embeds is not None:
        raise PipelineInputError("prompt", "and `prompt_embeds` cannot both be given.")
    if prompt is not None:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise PipelineInputError("prompt", f"must be a string or a list of strings, got {type(prompt)}.")
        if not all(prompt_clean(p) for p in prompts):
            raise PipelineInputError("prompt", "must not be empty.")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise PipelineInputError("negative_prompt", "and `negative_prompt_embeds` cannot both be given.")
    if prompt_embeds is not None and prompt_embeds.ndim != 3:
        raise PipelineInputError("prompt_embeds", f"must be [B, L, D], got {tuple(prompt_embeds.shape)}.")
    steps_ok = isinstance(num_inference_steps, int) and not isinstance(num_inference_steps, bool)
    if not steps_ok or not 1 <= num_inference_steps <= MAX_INFERENCE_STEPS:
        raise PipelineInputError(
            "num_inference_steps", f"must be an integer in [1, {MAX_INFERENCE_STEPS}], got {num_inference_steps!r}."
        )
    check_guidance_scale("guidance_scale", guidance_scale)
    if output_type not in output_types:
        raise PipelineInputError("output_type", f"must be one of {output_types}, got {output_type!r}.")
    if callback_on_step_end_tensor_inputs is not None:
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in callback_tensor_inputs]
        if unknown:
            raise PipelineInputError(
                "callback_on_step_end_tensor_inputs", f"must be in {callback_tensor_inputs}, got {unknown}."
            )


#: the largest guidance scale accepted (text, reference-image and audio guidance alike). The original's defaults are
#: 1 (its distilled release), 5 (extension; reference-image guidance) and 7.5 (reference text guidance), and video
#: models are guided with 3 to 10 in practice; far beyond that the amplified difference of the two predictions
#: swamps the prediction itself and the video saturates (1e30 gave a flat grey video), so 20 leaves room above any
#: real use and refuses what can only give noise.
MAX_GUIDANCE_SCALE = 20.0


def check_guidance_scale(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1.0 <= value <= MAX_GUIDANCE_SCALE:
        raise PipelineInputError(
            name,
            f"must be a number in [1, {MAX_GUIDANCE_SCALE:g}] (1 = guidance off; the original uses 1 to 7.5), "
            f"got {value!r}.",
        )


class SkyReelsV3PipelineMixin:
    """Helpers of the SkyReels-V3 pipelines (no `__init__`: every pipeline registers its own components)."""

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    #: the Wan VAE's factors (set from the loaded VAE in `__init__`; class values for the weight-free checks)
    vae_scale_factor_temporal = 4
    vae_scale_factor_spatial = 8

    def _set_vae_scale_factors(self) -> None:
        vae = getattr(self, "vae", None)
        if vae is not None:
            self.vae_scale_factor_temporal = vae.config.scale_factor_temporal
            self.vae_scale_factor_spatial = vae.config.scale_factor_spatial

    @classmethod
    def from_comfyui(cls, models_dir: str | os.PathLike | None = None, **kwargs):
        """Build the pipeline from single component files: a ComfyUI `models` folder and / or explicit files.

        `transformer=` names the transformer file (kijai's / ComfyUI's FP8-scaled files stay FP8 with their scales;
        original single files, GGUF); `text_encoder=`, `vae=`, `image_encoder=`, `audio_encoder=` are found in
        `models_dir` (`text_encoders/`, `vae/`, `clip_vision/`, `wav2vec2/`) or given as paths or objects;
        `scheduler=` is the task's scheduler; `tokenizer=` a folder or Hub id (default `google/umt5-xxl`). Every
        missing component is listed in one `MissingComponentsError` before any weight is read. Other keyword
        arguments: `loaders.comfyui.load_pipeline_from_files`.

        ```py
        >>> from skyreels_diffusers import SkyReelsV3TalkingAvatarPipeline
        >>> from skyreels_diffusers.app.tasks import TASKS  # the task's scheduler (its shift)

        >>> pipe = SkyReelsV3TalkingAvatarPipeline.from_comfyui(
        ...     "ComfyUI/models",
        ...     transformer="Wan21-SkyReelsV3-A2V_fp8_scaled_mixed.safetensors",
        ...     scheduler=TASKS["talking_avatar"].make_scheduler(),
        ... )
        ```
        """
        from ..loaders.comfyui import load_pipeline_from_files

        return load_pipeline_from_files(cls, models_dir, **kwargs)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def attention_kwargs(self):
        return self._attention_kwargs

    # ------------------------------------------------------------------------------------------------ text
    # Adapted from diffusers.pipelines.wan.pipeline_wan.WanPipeline._get_t5_prompt_embeds: runs the encoder where
    # it lives (offload hooks) and zeroes past each prompt's length by multiplying with the mask, as the original.
    def _get_t5_prompt_embeds(
        self,
        prompt: list[str],
        max_sequence_length: int,
        device: torch.device,
        dtype: torch.dtype,
        name: str = "prompt",
    ) -> torch.Tensor:
        prompt = [prompt_clean(p) for p in prompt]
        inputs = self.tokenizer(
            prompt,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        self._warn_truncated(prompt, inputs.attention_mask, max_sequence_length, name)
        text_device = get_module_execution_device(self.text_encoder)
        mask = inputs.attention_mask.to(text_device)
        embeds = self.text_encoder(inputs.input_ids.to(text_device), mask).last_hidden_state
        # zero past each prompt's length (all positions stay attended, as in the original)
        embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        return embeds.to(device=device, dtype=dtype)

    def _warn_truncated(self, prompt: list[str], mask: torch.Tensor, max_sequence_length: int, name: str) -> None:
        """Warn, with the count, about each prompt longer than the text encoder reads (cut, not an error)."""
        for text, used in zip(prompt, mask.sum(dim=1).tolist()):
            if used < max_sequence_length:
                continue  # padded: it fitted
            count = len(self.tokenizer(text, add_special_tokens=True, truncation=False, verbose=False).input_ids)
            if count > max_sequence_length:
                logger.warning(
                    f"{name} is {count} tokens; the text encoder reads the first {max_sequence_length} "
                    "(the rest is ignored)"
                )

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        do_classifier_free_guidance: bool = False,
        num_videos_per_prompt: int = 1,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """UMT5 embeddings `[B, max_sequence_length, 4096]`, zero past each prompt's token count (+ the negative
        prompt's when guidance is on)."""
        device = device or self._execution_device
        dtype = dtype or self.transformer.dtype
        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else prompt
            prompt_embeds = self._get_t5_prompt_embeds(prompt, max_sequence_length, device, dtype)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_videos_per_prompt, 0)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            batch = prompt_embeds.shape[0] // num_videos_per_prompt
            negative_prompt = negative_prompt if negative_prompt is not None else ""
            negative_prompt = [negative_prompt] * batch if isinstance(negative_prompt, str) else negative_prompt
            if len(negative_prompt) != batch:
                raise PipelineInputError("negative_prompt", f"has {len(negative_prompt)} entries for {batch} prompts.")
            negative_prompt_embeds = self._get_t5_prompt_embeds(
                negative_prompt, max_sequence_length, device, dtype, name="negative prompt"
            )
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(
                num_videos_per_prompt, 0
            )
        return prompt_embeds, negative_prompt_embeds

    # ------------------------------------------------------------------------------------------------ VAE
    def _latent_stats(self, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean, device=device, dtype=dtype).view(shape)
        std = torch.tensor(self.vae.config.latents_std, device=device, dtype=dtype).view(shape)
        return mean, std

    def encode_video(
        self, video: torch.Tensor, generator: torch.Generator | None = None, sample: bool = False
    ) -> torch.Tensor:
        """Pixels in [-1, 1] `[B, 3, F, H, W]` -> normalised latents (posterior mean, or a posterior sample drawn
        from `generator` when `sample=True`) in float32."""
        vae_device = get_module_execution_device(self.vae)
        posterior = self.vae.encode(video.to(vae_device, self.vae.dtype)).latent_dist
        latents = posterior.sample(generator) if sample else posterior.mode()
        mean, std = self._latent_stats(latents.device, latents.dtype)
        return ((latents - mean) / std).float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels in [-1, 1] `[B, 3, F, H, W]` (float32, on the VAE's device)."""
        vae_device = get_module_execution_device(self.vae)
        latents = latents.to(vae_device, self.vae.dtype)
        mean, std = self._latent_stats(latents.device, latents.dtype)
        return self.vae.decode(latents * std + mean, return_dict=False)[0].float()

    def latent_shape(self, batch_size: int, num_latent_frames: int, height: int, width: int) -> tuple:
        """`[B, C, F, H / 8, W / 8]`: the shape of the transformer's prediction for a `height x width` video."""
        return (
            batch_size,
            self.transformer.config.out_channels,
            num_latent_frames,
            height // self.vae_scale_factor_spatial,
            width // self.vae_scale_factor_spatial,
        )

    @staticmethod
    def prepare_latents(
        shape: tuple, generator, device, latents: torch.Tensor | None = None, name: str = "latents"
    ) -> torch.Tensor:
        """Initial noise (float32): `latents` when given (checked against `shape`), else drawn from `generator`."""
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if tuple(latents.shape) != tuple(shape):
            raise PipelineInputError(name, f"must have shape {tuple(shape)}, got {tuple(latents.shape)}.")
        return latents.to(device, torch.float32)

    @staticmethod
    def format_frames(frames01: torch.Tensor, output_type: str):
        """`[B, F, 3, H, W]` in [0, 1] -> the requested output type."""
        if output_type == "pt":
            return frames01
        array = frames01.permute(0, 1, 3, 4, 2).cpu().numpy()
        if output_type == "np":
            return array
        import PIL.Image

        return [[PIL.Image.fromarray(np.clip(np.rint(f * 255), 0, 255).astype(np.uint8)) for f in v] for v in array]

    def run_transformer(self, cache_name: str, step_index: int, **kwargs) -> torch.Tensor:
        """One transformer call inside its cache context (keeps cache hooks' state per guidance branch)."""
        with self.transformer.cache_context(
            cache_name, step_index=step_index, num_inference_steps=self._num_timesteps
        ):
            return self.transformer(**kwargs, attention_kwargs=self._attention_kwargs, return_dict=False)[0]

    def step_callback(self, step: int, t, latents, prompt_embeds, negative_prompt_embeds) -> tuple:
        """The user's `callback_on_step_end(pipe, step, t, {name: tensor})` with the requested tensors (when one was
        given); returns (latents, prompt_embeds, negative_prompt_embeds), replaced where it returned new ones."""
        callback, names = self._step_callback
        if callback is None:
            return latents, prompt_embeds, negative_prompt_embeds
        tensors = {
            "latents": latents,
            "prompt_embeds": prompt_embeds,
            "negative_prompt_embeds": negative_prompt_embeds,
        }
        outputs = callback(self, step, t, {name: tensors[name] for name in names}) or {}
        return tuple(
            outputs.get(name, tensors[name]) for name in ("latents", "prompt_embeds", "negative_prompt_embeds")
        )

    def _start_call(
        self, guidance_scale: float, attention_kwargs, callback_on_step_end=None, callback_on_step_end_tensor_inputs=()
    ) -> None:
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        self._num_timesteps = 0
        self._step_callback = (callback_on_step_end, callback_on_step_end_tensor_inputs)


class FiniteWatch:
    """Remembers the first denoising step whose latents hold NaN or infinite values, without a device-to-host sync
    per step; `check()` raises a clear error naming that step (instead of writing a black or NaN video)."""

    def __init__(self):
        self.first_bad = None

    def update(self, latents: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(latents).all()
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=latents.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def check(self, what: str = "latents") -> None:
        if self.first_bad is not None and (step := int(self.first_bad)) >= 0:
            raise FloatingPointError(
                f"The {what} hold NaN or infinite values from denoising step {step + 1} on: the model diverged "
                "(check the guidance scales, the dtype and any quantisation); nothing was decoded."
            )


class SkyReelsV3VideoInputMixin:
    """Helpers of the two video-extension pipelines: input video checks, decoding, resizing and output assembly."""

    @classmethod
    def check_video_inputs(
        cls, video, resolution, height, width, resize_mode, fps, num_condition_frames: int = 1
    ) -> None:
        from .buckets import bucket_size
        from .video_io import RESIZE_MODES

        check_size(height, width)
        if resize_mode is not None and resize_mode not in RESIZE_MODES:
            raise PipelineInputError("resize_mode", f"must be one of {RESIZE_MODES}, got {resize_mode!r}.")
        if fps is not None and not (isinstance(fps, (int, float)) and 1 <= fps <= 240):
            raise PipelineInputError("fps", f"must be a number in [1, 240], got {fps!r}.")
        if fps is not None and (fps / cls.vae_scale_factor_temporal) != int(fps / cls.vae_scale_factor_temporal):
            raise PipelineInputError("fps", f"must be a multiple of {cls.vae_scale_factor_temporal}, got {fps}.")
        if video is None:
            raise PipelineInputError("video", "is required.")
        if not isinstance(video, (str, os.PathLike)) and len(video) < num_condition_frames:  # decoded frames
            raise PipelineInputError(
                "video", f"has {len(video)} frames; at least {num_condition_frames} condition frames are needed."
            )
        if height is None:
            bucket_size(1, 1, resolution)  # validates `resolution`

    @staticmethod
    def load_input_video(
        video,
        num_condition_frames: int,
        resolution: str,
        height: int | None,
        width: int | None,
        whole: bool = False,
    ) -> tuple[np.ndarray, int, int]:
        """Decode the input video's last `num_condition_frames` frames (a file: seeking to its tail, never holding
        more decoded frames than that; `whole`: every frame, for `return_input_video`); returns (uint8 frames,
        height, width)."""
        from .buckets import bucket_size
        from .video_io import load_video_tail

        frames, _ = load_video_tail(video, None if whole else num_condition_frames, name="video")
        if len(frames) < num_condition_frames:
            raise PipelineInputError(
                "video", f"has {len(frames)} frames; at least {num_condition_frames} condition frames are needed."
            )
        if height is None:
            height, width = bucket_size(frames.shape[1], frames.shape[2], resolution)
        return frames, height, width

    def format_output(
        self,
        video_frames: np.ndarray,
        frames: np.ndarray,
        height: int,
        width: int,
        resize_mode: str,
        return_input_video: bool,
        output_type: str,
    ):
        """uint8 `[B, F, H, W, 3]` generated frames (optionally after the resized input video) -> `output_type`."""
        from .video_io import pixels_to_uint8, resize_frames

        if return_input_video:
            source = resize_frames(frames, height, width, resize_mode)[0].permute(1, 2, 3, 0)
            source = pixels_to_uint8(source)[None].repeat(len(video_frames), axis=0)
            video_frames = np.concatenate([source, video_frames], axis=1)
        frames01 = torch.from_numpy(video_frames).float().div(255).permute(0, 1, 4, 2, 3)
        return self.format_frames(frames01, output_type)

    def predict_noise(
        self, step: int, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None, **model_inputs
    ) -> torch.Tensor:
        """The transformer's flow prediction (float32), with text classifier-free guidance when it is on."""
        cond = self.run_transformer("cond", step, encoder_hidden_states=prompt_embeds, **model_inputs).float()
        if not self.do_classifier_free_guidance:
            return cond
        uncond = self.run_transformer("uncond", step, encoder_hidden_states=negative_prompt_embeds, **model_inputs)
        return uncond.float() + self.guidance_scale * (cond - uncond.float())
