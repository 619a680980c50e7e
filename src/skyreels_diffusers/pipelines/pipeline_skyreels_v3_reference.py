"""SkyReels-V3 reference-to-video: 1-4 reference images + prompt -> video."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from diffusers.utils import replace_example_docstring
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, UMT5EncoderModel

from ..loaders.pipeline_folder import StrictPipelineLoadingMixin
from ..models import SkyReelsV3Transformer3DModel
from ..schedulers import SkyReelsV3FlowUniPCScheduler
from ..schedulers.scheduling_flow_unipc import SIGMA_MAX_FP64
from .buckets import bucket_size, check_size
from .common import (
    FiniteWatch,
    PipelineInputError,
    SkyReelsV3PipelineMixin,
    SkyReelsV3PipelineOutput,
    check_common_inputs,
    check_guidance_scale,
    exact_flow_scheduler,
)
from .video_io import ImageInput, letterbox, load_image


MAX_REFERENCES = 4
#: 30 s at 24 fps: the longest video one call makes (the model was made for 5 s; memory grows with the length)
MAX_NUM_FRAMES = 24 * 30 + 1

EXAMPLE_DOC_STRING = """
    Examples:
        ```python
        >>> import torch
        >>> from skyreels_diffusers import SkyReelsV3ReferencePipeline
        >>> from skyreels_diffusers.pipelines.video_io import write_video

        >>> pipe = SkyReelsV3ReferencePipeline.from_pretrained("path/to/SkyReels-V3-R2V-diffusers", torch_dtype=torch.bfloat16)
        >>> pipe.vae.to(torch.float32)
        >>> pipe.enable_model_cpu_offload()
        >>> video = pipe(
        ...     ref_images=["girl.png", "dog.png"],
        ...     prompt="A girl walks her dog along a beach at sunset.",
        ...     resolution="720P",
        ...     generator=torch.Generator("cuda").manual_seed(42),
        ... ).frames[0]
        >>> write_video(video, "r2v.mp4", fps=24)
        ```
"""


class SkyReelsV3ReferencePipeline(
    StrictPipelineLoadingMixin, DiffusionPipeline, WanLoraLoaderMixin, SkyReelsV3PipelineMixin
):
    r"""
    Reference-to-video generation with SkyReels-V3 (14B).

    Each reference image is letterboxed on white to the output size, VAE-encoded as its own one-frame video and
    sampled from the posterior with the pipeline's generator right after the noise; the references are padded with
    zero latents to 4 frames and appended to the noisy latents along time (same timestep as the video frames). The
    transformer's output is cut back to the video frames.

    Components: `tokenizer` (UMT5), `text_encoder` (`UMT5EncoderModel`), `transformer`
    (`SkyReelsV3Transformer3DModel`), `vae` (`AutoencoderKLWan`), `scheduler` (`SkyReelsV3FlowUniPCScheduler`: UniPC
    with the original's flow sigmas, shift 5).

    Differences from the original, on purpose: the scheduler receives the transformer's prediction in float32 (the
    original let diffusers evaluate `sigma * prediction` in bf16); `reproduce_original=True` restores that.
    Everything else, including the RNG order and the rounding to uint8, is the original's.

    LoRA: `load_lora_weights` / `set_adapters` / `fuse_lora` come from diffusers' `WanLoraLoaderMixin` (Wan2.1-14B
    LoRAs in diffusers or Wan-native format; needs peft).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = []
    _flow_sigma_max = SIGMA_MAX_FP64

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
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    @classmethod
    def check_inputs(
        cls,
        ref_images,
        prompt,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        num_frames: int = 121,
        resolution: str = "720P",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 8,
        guidance_scale: float = 1.0,
        guidance_scale_img: float = 1.0,
        output_type: str = "np",
        callback_on_step_end_tensor_inputs=None,
    ) -> None:
        """Validate every argument before any model work (needs no weights: a classmethod)."""
        cls.check_reference_count(ref_images)
        temporal = cls.vae_scale_factor_temporal
        if not isinstance(num_frames, int) or not 1 <= num_frames <= MAX_NUM_FRAMES or (num_frames - 1) % temporal:
            raise PipelineInputError(
                "num_frames",
                f"must be {temporal}k+1 up to {MAX_NUM_FRAMES} (24 * seconds + 1 for 1-30 s; 121 = 5 s), "
                f"got {num_frames!r}.",
            )
        check_size(height, width)
        if height is None:
            bucket_size(1, 1, resolution)  # validates `resolution`
        check_guidance_scale("guidance_scale_img", guidance_scale_img)
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

    @staticmethod
    def check_reference_count(ref_images) -> None:
        """1 to 4 references (checked before any of them is opened)."""
        if isinstance(ref_images, (str, bytes, PIL.Image.Image)) or not hasattr(ref_images, "__len__"):
            ref_images = [ref_images]
        if not 1 <= len(ref_images) <= MAX_REFERENCES:
            raise PipelineInputError("ref_images", f"must hold 1 to {MAX_REFERENCES} images, got {len(ref_images)}.")

    @staticmethod
    def load_references(
        ref_images, resolution: str, height: int | None, width: int | None, drop_alpha: bool = False
    ) -> tuple[list, int, int]:
        """Open the references (EXIF orientation applied; transparent pixels white, or with `drop_alpha` the colour
        they hide, as the original's `convert("RGB")`); the output size is the first one's bucket unless given."""
        if isinstance(ref_images, (str, bytes, PIL.Image.Image)) or not hasattr(ref_images, "__len__"):
            ref_images = [ref_images]
        images = [
            load_image(image, name=f"ref_images[{i}]", drop_alpha=drop_alpha) for i, image in enumerate(ref_images)
        ]
        if height is None:
            height, width = bucket_size(images[0].height, images[0].width, resolution)
        return images, height, width

    def prepare_references(
        self, images: list[PIL.Image.Image], height: int, width: int, generator, device: torch.device
    ) -> torch.Tensor:
        """Letterbox, encode and posterior-sample each reference; pad with zeros to 4 frames -> `[1, C, 4, h, w]`."""
        latents = []
        for image in images:
            boxed = np.asarray(letterbox(image, width, height), dtype=np.float32) / 255.0
            pixels = torch.from_numpy(boxed).permute(2, 0, 1)[None, :, None].to(device)  # [1, 3, 1, H, W]
            latents.append(self.encode_video(pixels * 2 - 1, generator=generator, sample=True).to(device))
        zeros = torch.zeros_like(latents[0])
        latents += [zeros] * (MAX_REFERENCES - len(latents))
        return torch.cat(latents, dim=2)

    def predict_with_references(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        step: int,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        references: torch.Tensor,
        guidance_scale_img: float,
        keep_dtype: bool,
    ) -> torch.Tensor:
        """The flow prediction for the video frames, with text (and reference-image) guidance when on."""
        timestep = t.expand(latents.shape[0])
        num_frames = latents.shape[2]

        def branch(name: str, embeds: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
            hidden_states = torch.cat([latents, refs], dim=2).to(self.transformer.dtype)
            out = self.run_transformer(
                name, step, hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=embeds
            )[:, :, :num_frames]
            return out if keep_dtype else out.float()  # the original guided in the model's dtype

        cond = branch("cond", prompt_embeds, references)
        if not self.do_classifier_free_guidance:
            return cond
        uncond_text = branch("uncond", negative_prompt_embeds, references)
        if guidance_scale_img <= 1.0:
            return uncond_text + self.guidance_scale * (cond - uncond_text)
        uncond_all = branch("uncond_img", negative_prompt_embeds, torch.zeros_like(references))
        return (
            uncond_all + guidance_scale_img * (uncond_text - uncond_all) + self.guidance_scale * (cond - uncond_text)
        )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        ref_images: ImageInput | list[ImageInput],
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 121,
        resolution: str = "720P",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 8,
        sigmas: list[float] | None = None,
        timesteps: list[int] | None = None,
        guidance_scale: float = 1.0,
        guidance_scale_img: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int = 512,
        reproduce_original: bool = False,
    ) -> SkyReelsV3PipelineOutput | tuple:
        r"""
        Generate a video of the subjects in `ref_images`.

        Args:
            ref_images: 1-4 reference images (paths or PIL images; EXIF orientation applied). The first one picks
                the resolution bucket.
            prompt: the text prompt (or pass `prompt_embeds`).
            negative_prompt: used only when guidance is on (default "").
            num_frames: frames to generate, `24 * seconds + 1` (default 121 = 5 s at 24 fps).
            resolution: "480P", "540P" or "720P" bucket table; the bucket closest to the first reference's aspect.
            height, width: explicit output size (multiples of 16), overriding the bucket.
            num_inference_steps: denoising steps (8, as the distilled checkpoint was made for).
            sigmas: custom unshifted flow sigmas (diffusers' semantics; the scheduler applies its shift); default:
                the original's schedule.
            timesteps: custom timesteps, for schedulers that accept them.
            guidance_scale: text guidance (1.0 = off, the original's default).
            guidance_scale_img: reference-image guidance, applied together with text guidance (> 1 only with
                `guidance_scale > 1`): `u_ti + g_img (u_t - u_ti) + g (c - u_t)`.
            generator: draws the noise first, then one posterior sample per reference (the original's order).
            latents: initial noise `[1, 16, (num_frames-1)/4+1, H/8, W/8]` instead of drawing it.
            prompt_embeds, negative_prompt_embeds: precomputed UMT5 embeddings `[B, 512, 4096]`.
            output_type: "np" (default), "pil", "pt" or "latent".
            return_dict: return a `SkyReelsV3PipelineOutput` instead of a tuple.
            attention_kwargs: passed to the transformer (e.g. `{"scale": lora_scale}`).
            callback_on_step_end: `fn(pipe, step, timestep, tensors) -> dict` after every step.
            callback_on_step_end_tensor_inputs: names from `_callback_tensor_inputs` passed to the callback.
            max_sequence_length: text tokens (512).
            reproduce_original: the original's conventions where they differ from this pipeline's (the scheduler
                gets the prediction in the transformer's dtype): the original's video for the same inputs and seed.

        Examples:
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs, load the references (before any model work)
        self.check_inputs(
            ref_images,
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            num_frames,
            resolution,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            guidance_scale_img,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        images, height, width = self.load_references(ref_images, resolution, height, width, reproduce_original)
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

        # 3. Timesteps
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, timesteps=timesteps, sigmas=sigmas
        )
        self._num_timesteps = len(timesteps)

        # 4. Noise first, then the reference posterior samples from the same generator (the original's RNG order)
        num_latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        shape = self.latent_shape(batch_size, num_latent_frames, height, width)
        latents = self.prepare_latents(shape, generator, device, latents)
        references = self.prepare_references(images, height, width, generator, device).expand(
            batch_size, -1, -1, -1, -1
        )

        # 5. Denoising loop
        predict = partial(
            self.predict_with_references,
            references=references,
            guidance_scale_img=guidance_scale_img,
            keep_dtype=reproduce_original,
        )
        self.scheduler.set_begin_index(0)  # no device-to-host sync to find the step index
        watch = FiniteWatch()
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                noise_pred = predict(
                    latents, t, i, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds
                )
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                latents, prompt_embeds, negative_prompt_embeds = self.step_callback(
                    i, t, latents, prompt_embeds, negative_prompt_embeds
                )
                watch.update(latents, i)
                progress_bar.update()
        self._current_timestep = None

        # 6. Decode
        watch.check()
        if output_type == "latent":
            video = latents
        else:
            video = self.video_processor.postprocess_video(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return SkyReelsV3PipelineOutput(frames=video)
