"""What the SkyReels-V3 pipelines share: prompt cleaning and encoding, VAE latent (de)normalisation, the denoising
loop (progress bar, interrupt, `callback_on_step_end`, cache contexts), input checks and the output dataclass."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import regex as re
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from transformers import AutoTokenizer, UMT5EncoderModel

from ..models import SkyReelsV3Transformer3DModel
from ..schedulers import SkyReelsV3FlowUniPCScheduler
from ..schedulers.scheduling_flow_unipc import SIGMA_MAX_FP32

logger = logging.get_logger(__name__)

try:
    import ftfy
except ImportError:  # pragma: no cover - ftfy is a dependency
    ftfy = None


def prompt_clean(text: str) -> str:
    """The original's prompt cleaning: ftfy, HTML-unescape twice, strip, collapse whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


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
        logger.info("Using the original SkyReels-V3 flow-sigma spacing (SkyReelsV3FlowUniPCScheduler) for the "
                    "UniPCMultistepScheduler of this pipeline; pass `sigmas=` for another spacing.")
        return SkyReelsV3FlowUniPCScheduler.from_config(scheduler.config, flow_sigma_max=flow_sigma_max)
    return scheduler


class _NoProgressBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1):
        pass


class SkyReelsV3PipelineBase(DiffusionPipeline, WanLoraLoaderMixin):
    """Base class of the SkyReels-V3 pipelines (not a pipeline on its own); its `__init__` registers the five
    components of the reference and extension pipelines (the avatar adds its encoders in its own).

    LoRA: `load_lora_weights` / `set_adapters` / `fuse_lora` come from diffusers' `WanLoraLoaderMixin` (the
    transformer keeps Wan's parameter names, so Wan2.1-14B LoRAs in diffusers or Wan-native format load; needs peft).
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _output_types = ("np", "pil", "pt", "latent")
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    #: the first unshifted flow sigma of the original's schedule for this task (see `SkyReelsV3FlowUniPCScheduler`)
    _flow_sigma_max: float = SIGMA_MAX_FP32

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        transformer: SkyReelsV3Transformer3DModel,
        vae: AutoencoderKLWan,
        scheduler: SkyReelsV3FlowUniPCScheduler,
    ):
        super().__init__()
        scheduler = exact_flow_scheduler(scheduler, self._flow_sigma_max)
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler
        )
        self._set_vae_scale_factors()

    def _set_vae_scale_factors(self) -> None:
        vae = getattr(self, "vae", None)
        self.vae_scale_factor_temporal = vae.config.scale_factor_temporal if vae is not None else 4
        self.vae_scale_factor_spatial = vae.config.scale_factor_spatial if vae is not None else 8

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

    # ------------------------------------------------------------------------------------------------ checks
    def _check_common_inputs(
        self,
        prompt,
        negative_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        num_inference_steps,
        guidance_scale,
        output_type,
        callback_on_step_end_tensor_inputs,
    ) -> None:
        if prompt is None and prompt_embeds is None:
            raise ValueError("Provide `prompt` or `prompt_embeds`.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Provide either `prompt` or `prompt_embeds`, not both.")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt)}.")
            if not all(prompt_clean(p) for p in prompts):
                raise ValueError("`prompt` must not be empty.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Provide either `negative_prompt` or `negative_prompt_embeds`, not both.")
        if prompt_embeds is not None and prompt_embeds.ndim != 3:
            raise ValueError(f"`prompt_embeds` must be [B, L, D], got {tuple(prompt_embeds.shape)}.")
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= 1000:
            raise ValueError(f"`num_inference_steps` must be an integer in [1, 1000], got {num_inference_steps!r}.")
        if not guidance_scale >= 1.0:
            raise ValueError(f"`guidance_scale` must be >= 1 (1 = guidance off), got {guidance_scale!r}.")
        if output_type not in self._output_types:
            raise ValueError(f"`output_type` must be one of {self._output_types}, got {output_type!r}.")
        if callback_on_step_end_tensor_inputs is not None:
            unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if unknown:
                raise ValueError(
                    f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {unknown}."
                )

    def _prepare_call(self, guidance_scale: float, attention_kwargs, callback_on_step_end, tensor_inputs):
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        self._num_timesteps = 0
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            tensor_inputs = callback_on_step_end.tensor_inputs
        return tensor_inputs

    # ------------------------------------------------------------------------------------------------ text
    def _get_t5_prompt_embeds(
        self, prompt: list[str], max_sequence_length: int, device: torch.device, dtype: torch.dtype
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
        text_device = get_module_execution_device(self.text_encoder)
        mask = inputs.attention_mask.to(text_device)
        embeds = self.text_encoder(inputs.input_ids.to(text_device), mask).last_hidden_state
        # zero past each prompt's length (all positions stay attended, as in the original)
        embeds = embeds * mask.unsqueeze(-1).to(embeds.dtype)
        return embeds.to(device=device, dtype=dtype)

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
                raise ValueError(f"`negative_prompt` has {len(negative_prompt)} entries for {batch} prompts.")
            negative_prompt_embeds = self._get_t5_prompt_embeds(negative_prompt, max_sequence_length, device, dtype)
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

    def latent_shape(self, batch_size: int, num_latent_frames: int, height: int, width: int) -> tuple:
        """`[B, C, F, H / 8, W / 8]`: the shape of the transformer's prediction for a `height x width` video."""
        return (batch_size, self.transformer.config.out_channels, num_latent_frames,
                height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial)

    @staticmethod
    def prepare_latents(shape: tuple, generator, device, latents: torch.Tensor | None = None,
                        name: str = "latents") -> torch.Tensor:
        """Initial noise (float32): `latents` when given (checked against `shape`), else drawn from `generator`."""
        if latents is None:
            return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"`{name}` must have shape {tuple(shape)}, got {tuple(latents.shape)}.")
        return latents.to(device, torch.float32)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> pixels in [-1, 1] `[B, 3, F, H, W]` (float32, on the VAE's device)."""
        vae_device = get_module_execution_device(self.vae)
        latents = latents.to(vae_device, self.vae.dtype)
        mean, std = self._latent_stats(latents.device, latents.dtype)
        return self.vae.decode(latents * std + mean, return_dict=False)[0].float()

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

    def postprocess(self, video: torch.Tensor, output_type: str):
        """Decoded pixels `[B, 3, F, H, W]` in [-1, 1] -> frames of `output_type`."""
        frames01 = (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
        return self.format_frames(frames01, output_type)

    # ------------------------------------------------------------------------------------------------ loop
    def denoise(
        self,
        latents: torch.Tensor,
        predict: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor],
        num_inference_steps: int,
        device: torch.device,
        state: dict,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        after_step: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        progress: bool = True,
        sigmas: list[float] | None = None,
        timesteps: list | None = None,
        float_prediction: bool = True,
    ) -> torch.Tensor:
        """Run the scheduler over `latents` (float32) with `predict(latents, t, state)` giving the flow prediction.

        `state` holds the tensors a callback may read or replace (`prompt_embeds`, `negative_prompt_embeds`);
        `callback_on_step_end(pipe, step, t, tensors)` may return replacements for `latents` and for them.
        `after_step(latents, step)` is the pipeline's own per-step update (applied before the user callback).
        `sigmas` / `timesteps` replace the scheduler's schedule (diffusers' `retrieve_timesteps` semantics).
        `float_prediction=False` hands the scheduler the prediction in the transformer's dtype (the original did).
        """
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps=timesteps, sigmas=sigmas
        )
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)  # no device-to-host sync to find the step index
        with (self.progress_bar(total=len(timesteps)) if progress else _NoProgressBar()) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                noise_pred = predict(latents, t, {**state, "step_index": i})
                noise_pred = noise_pred.float() if float_prediction else noise_pred
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if after_step is not None:
                    latents = after_step(latents, i)
                if callback_on_step_end is not None:
                    tensors = {k: latents if k == "latents" else state.get(k) for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, t, tensors) or {}
                    latents = outputs.pop("latents", latents)
                    state.update({k: v for k, v in outputs.items() if k in self._callback_tensor_inputs})
                progress_bar.update()
        self._current_timestep = None
        return latents

    def run_transformer(self, cache_name: str, step_index: int, **kwargs) -> torch.Tensor:
        """One transformer call inside its cache context (keeps cache hooks' state per guidance branch)."""
        with self.transformer.cache_context(
            cache_name, step_index=step_index, num_inference_steps=self._num_timesteps
        ):
            return self.transformer(**kwargs, attention_kwargs=self._attention_kwargs, return_dict=False)[0]


class SkyReelsV3VideoPipelineBase(SkyReelsV3PipelineBase):
    """Base of the two video-extension pipelines: input video loading, bucketing and resizing."""

    def load_input_video(
        self, video, num_condition_frames: int, resolution: str, height: int | None, width: int | None,
        resize_mode: str, fps: float | None,
    ) -> tuple[np.ndarray, int, int, float]:
        """Validate and decode the input video; returns (uint8 frames, height, width, fps)."""
        from .buckets import bucket_size, check_size
        from .video_io import RESIZE_MODES, load_video

        check_size(height, width)
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"`resize_mode` must be one of {RESIZE_MODES}, got {resize_mode!r}.")
        if fps is not None and not (isinstance(fps, (int, float)) and 1 <= fps <= 240):
            raise ValueError(f"`fps` must be a number in [1, 240], got {fps!r}.")
        if video is None:
            raise ValueError("`video` is required.")
        frames, _ = load_video(video, name="video")
        if len(frames) < num_condition_frames:
            raise ValueError(
                f"`video` has {len(frames)} frames; at least {num_condition_frames} condition frames are needed."
            )
        if height is None:
            height, width = bucket_size(frames.shape[1], frames.shape[2], resolution)
        return frames, height, width, float(fps or 24)

    def condition_latents(self, frames: np.ndarray, height: int, width: int, resize_mode: str, device) -> torch.Tensor:
        """uint8 frames -> normalised VAE latents (posterior mean) `[1, 16, (F-1)/4+1, h, w]`."""
        from .video_io import resize_frames

        return self.encode_video(resize_frames(frames, height, width, resize_mode).to(device)).to(device)

    def format_output(
        self, video_frames: np.ndarray, frames: np.ndarray, height: int, width: int, resize_mode: str,
        return_input_video: bool, output_type: str,
    ):
        """uint8 `[B, F, H, W, 3]` generated frames (optionally after the resized input video) -> `output_type`."""
        from .video_io import pixels_to_uint8, resize_frames

        if return_input_video:
            source = resize_frames(frames, height, width, resize_mode)[0].permute(1, 2, 3, 0)
            source = pixels_to_uint8(source)[None].repeat(len(video_frames), axis=0)
            video_frames = np.concatenate([source, video_frames], axis=1)
        frames01 = torch.from_numpy(video_frames).float().div(255).permute(0, 1, 4, 2, 3)
        return self.format_frames(frames01, output_type)

    def guided(self, branch: Callable[[str, torch.Tensor], torch.Tensor], state: dict) -> torch.Tensor:
        """Text classifier-free guidance over a `branch(cache_name, embeds)` prediction function."""
        cond = branch("cond", state["prompt_embeds"])
        if not self.do_classifier_free_guidance:
            return cond
        uncond = branch("uncond", state["negative_prompt_embeds"])
        return uncond + self.guidance_scale * (cond - uncond)
