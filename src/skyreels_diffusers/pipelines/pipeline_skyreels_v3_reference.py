"""SkyReels-V3 reference-to-video: 1-4 reference images + prompt -> video."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers.utils import replace_example_docstring

from ..schedulers.scheduling_flow_unipc import SIGMA_MAX_FP64
from .buckets import bucket_size, check_size
from .common import SkyReelsV3PipelineBase, SkyReelsV3PipelineOutput
from .video_io import ImageInput, letterbox, load_image

MAX_REFERENCES = 4

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


class SkyReelsV3ReferencePipeline(SkyReelsV3PipelineBase):
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
    """

    _flow_sigma_max = SIGMA_MAX_FP64

    def check_inputs(
        self,
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
    ) -> list:
        """Validate everything before any model work; returns the loaded reference images."""
        if isinstance(ref_images, (str, bytes)) or not hasattr(ref_images, "__len__"):
            ref_images = [ref_images]
        if not 1 <= len(ref_images) <= MAX_REFERENCES:
            raise ValueError(f"`ref_images` must hold 1 to {MAX_REFERENCES} images, got {len(ref_images)}.")
        images = [load_image(image, name=f"ref_images[{i}]") for i, image in enumerate(ref_images)]
        if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % self.vae_scale_factor_temporal:
            raise ValueError(
                f"`num_frames` must be 4k+1 (e.g. 24*duration+1 = 121 for 5 s), got {num_frames!r}."
            )
        check_size(height, width)
        if height is None:
            bucket_size(images[0].height, images[0].width, resolution)  # validates `resolution`
        if not guidance_scale_img >= 1.0:
            raise ValueError(f"`guidance_scale_img` must be >= 1, got {guidance_scale_img!r}.")
        self._check_common_inputs(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_inference_steps, guidance_scale,
            output_type, callback_on_step_end_tensor_inputs,
        )
        return images

    def prepare_references(
        self, images: list, height: int, width: int, generator, device: torch.device
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
        guidance_scale: float = 1.0,
        guidance_scale_img: float = 1.0,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
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
            sigmas: custom unshifted flow sigmas (diffusers' semantics; the scheduler applies its shift); default:
                the original's schedule.
            timesteps: custom timesteps, for schedulers that accept them.
            reproduce_original: the original's conventions where they differ from this pipeline's (the scheduler
                gets the prediction in the transformer's dtype): the original's video for the same inputs and seed.

        Examples:
        """
        images = self.check_inputs(
            ref_images, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, num_frames, resolution,
            height, width, num_inference_steps, guidance_scale, guidance_scale_img, output_type,
            callback_on_step_end_tensor_inputs,
        )
        callback_on_step_end_tensor_inputs = self._prepare_call(
            guidance_scale, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        if height is None:
            height, width = bucket_size(images[0].height, images[0].width, resolution)
        device = self._execution_device

        # 1. Text
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, negative_prompt, self.do_classifier_free_guidance, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, max_sequence_length=max_sequence_length, device=device,
        )
        batch_size = prompt_embeds.shape[0]

        # 2. Noise first, then the reference posterior samples from the same generator
        num_latent_frames = (num_frames - 1) // self.vae_scale_factor_temporal + 1
        latents = self.prepare_latents(
            self.latent_shape(batch_size, num_latent_frames, height, width), generator, device, latents
        )
        references = self.prepare_references(images, height, width, generator, device).expand(batch_size, -1, -1, -1, -1)
        no_references = torch.zeros_like(references)

        # 3. Denoise
        dtype = self.transformer.dtype

        def predict(latents: torch.Tensor, t: torch.Tensor, state: dict) -> torch.Tensor:
            timestep = t.expand(latents.shape[0])

            def branch(name: str, embeds: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
                hidden_states = torch.cat([latents, refs], dim=2).to(dtype)
                out = self.run_transformer(
                    name, state["step_index"], hidden_states=hidden_states, timestep=timestep,
                    encoder_hidden_states=embeds,
                )
                out = out[:, :, :num_latent_frames]
                return out if reproduce_original else out.float()  # the original guided in the model's dtype

            cond = branch("cond", state["prompt_embeds"], references)
            if not self.do_classifier_free_guidance:
                return cond
            uncond_text = branch("uncond", state["negative_prompt_embeds"], references)
            if guidance_scale_img <= 1.0:
                return uncond_text + guidance_scale * (cond - uncond_text)
            uncond_all = branch("uncond_img", state["negative_prompt_embeds"], no_references)
            return (
                uncond_all + guidance_scale_img * (uncond_text - uncond_all) + guidance_scale * (cond - uncond_text)
            )

        state = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        latents = self.denoise(
            latents, predict, num_inference_steps, device, state, callback_on_step_end,
            callback_on_step_end_tensor_inputs, sigmas=sigmas, timesteps=timesteps,
            float_prediction=not reproduce_original,
        )

        # 4. Decode
        if output_type == "latent":
            video = latents
        else:
            video = self.postprocess(self.decode_latents(latents), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return SkyReelsV3PipelineOutput(frames=video)

