"""SkyReels-V3 talking avatar: portrait + speech -> lip-synced video (25 fps) with the audio."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from ..loaders.pipeline_folder import StrictPipelineLoadingMixin
from ..models import SkyReelsV3Transformer3DModel
from ..schedulers import SkyReelsV3FlowEulerScheduler
from .audio_io import DEFAULT_MAX_SECONDS, VIDEO_FPS, SpeechAudio, audio_windows, load_speech, wav2vec2_features
from .buckets import avatar_bucket_size, check_size
from .color import match_colors
from .common import (
    FiniteWatch,
    PipelineInputError,
    SkyReelsV3PipelineMixin,
    check_common_inputs,
    check_guidance_scale,
)
from .resume import ResumeStore, fingerprint, module_identity
from .video_io import ImageInput, load_image, pixels_to_uint8


WINDOW_FRAMES = 81
MOTION_FRAMES = 5
DROP_FRAMES = 12
PSEUDO_FRAMES = 5
DEFAULT_WINDOW_PROMPT = "a person is talking"
NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards"
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

EXAMPLE_DOC_STRING = """
    Examples:
        ```python
        >>> import torch
        >>> from skyreels_diffusers import SkyReelsV3TalkingAvatarPipeline
        >>> from skyreels_diffusers.pipelines.video_io import write_video

        >>> pipe = SkyReelsV3TalkingAvatarPipeline.from_pretrained("path/to/SkyReels-V3-A2V-diffusers", torch_dtype=torch.bfloat16)
        >>> pipe.vae.to(torch.float32)
        >>> pipe.audio_encoder.to(torch.float32)
        >>> pipe.enable_model_cpu_offload()
        >>> out = pipe(image="portrait.png", audio="speech.wav", prompt="A woman talks to the camera.",
        ...            generator=torch.Generator().manual_seed(42))
        >>> write_video(out.frames[0], "avatar.mp4", fps=out.fps, audio=out.audio, audio_sample_rate=out.audio_sample_rate)
        ```
"""


@dataclass
class WindowPlan:
    """How the original covers `num_frames` video frames with 81-frame windows (all counts in video frames)."""

    num_frames: int  # requested (ceil(audio seconds * 25))
    video_length: int  # padded so that the windows tile it exactly
    keyframes: list[int]  # frames of the keyframe clip used as pseudo end frames, one per window
    starts: list[int] = field(default_factory=list)  # window start frames; empty: the keyframe clip is the video
    kept: list[int] = field(default_factory=list)  # frames each window contributes


def plan_windows(
    num_frames: int, window: int = WINDOW_FRAMES, motion: int = MOTION_FRAMES, drop: int = DROP_FRAMES
) -> WindowPlan:
    """The original's long-video arithmetic.

    Windows advance by `window - motion - drop` (64) frames. The length is padded to the next `81 + 64 k`. Keyframe
    indices `[0, 80, 144, ...] + [len - 1]` are mapped linearly onto the 81-frame keyframe clip (numpy's
    round-half-even) and the first is dropped. The first window keeps its first 69 frames, middle ones 64 (after
    the 5 motion frames), the last 76. Example: 250 frames -> length 273, keyframes [24, 42, 61, 80], windows at
    0/64/128/192 keeping 69 + 64 + 64 + 76 = 273, trimmed to 250.
    """
    if num_frames < window:
        return WindowPlan(num_frames, num_frames, [])
    stride = window - motion - drop
    remainder = (num_frames - window) % stride
    length = num_frames + (stride - remainder if remainder else 0)
    indices = [0]
    position = window - 1
    while position < length - 1:
        indices.append(position)
        position += stride
    indices.append(length - 1)
    mapped = np.clip(np.round(np.array(indices) * (window - 1) / (length - 1)), 0, window - 1).astype(int)
    starts = list(range(0, length - window + 1, stride))
    kept = []
    for k, start in enumerate(starts):
        last = start + window == length
        frames = window if last else window - drop
        kept.append(frames if k == 0 else frames - motion)
    return WindowPlan(num_frames, length, [int(i) for i in mapped[1:]], starts, kept)


def extend_audio(features: torch.Tensor, length: int) -> torch.Tensor:
    """Pad audio features to `length` frames with their own last frames, time-reversed (the original's padding)."""
    missing = length - len(features)
    if missing <= 0:
        return features
    return torch.cat([features, features[-missing:].flip(0)])


@dataclass
class SkyReelsV3AvatarPipelineOutput(BaseOutput):
    """Output of the talking-avatar pipeline.

    Args:
        frames: `[1, F, H, W, 3]` floats in [0, 1] ("np"), `[1, F, 3, H, W]` ("pt") or PIL lists ("pil");
            `F = ceil(audio seconds * 25)`; with "latent" the final latents of every clip `[1, clips, 16, 21, h, w]`
            (clip 0 = the keyframe clip, then the windows).
        audio: the waveform to mux (`[samples]` or `[samples, channels]` float32), None with precomputed features.
        audio_sample_rate: its sample rate.
        fps: the video frame rate (25).
    """

    frames: Any
    audio: np.ndarray | None = None
    audio_sample_rate: int | None = None
    fps: int = VIDEO_FPS


@dataclass
class AvatarRun:
    """What every clip of one call shares: embeddings, the portrait, the generator and the sampling settings."""

    reference: torch.Tensor  # [3, H, W] in [-1, 1]
    prompt_embeds: torch.Tensor
    window_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    image_embeds: torch.Tensor
    audio_embeds: torch.Tensor  # [T, layers, dim] float32
    generator: torch.Generator
    num_inference_steps: int
    sigmas: list[float] | None
    timesteps: list[float] | None
    audio_guidance_scale: float
    clip_from_reference: bool
    color_match_strength: float
    reproduce_original: bool
    callback_on_step_end: Callable | None
    callback_on_step_end_tensor_inputs: list[str]
    clip_latents: list[torch.Tensor] = field(default_factory=list)


class SkyReelsV3TalkingAvatarPipeline(
    StrictPipelineLoadingMixin, DiffusionPipeline, WanLoraLoaderMixin, SkyReelsV3PipelineMixin
):
    r"""
    Talking-avatar generation with SkyReels-V3 (19B): a portrait and speech (up to 200 s) -> a lip-synced video.

    A keyframe clip (81 frames) is generated from the portrait with the user prompt; long audio is then covered by
    81-frame windows advancing 64 frames: each window is conditioned on the last 5 frames of the previous one
    (motion frames, whose latents are re-noised to the current noise level at every step) and on 5 "pseudo" end
    frames taken from the keyframe clip, and every decoded clip is colour-matched (Lab mean/std) to the portrait.
    Audio enters through wav2vec2 features (interpolated to 25 fps) in per-frame audio cross-attention; the image
    through CLIP (penultimate layer) and channel-concatenated condition latents.

    Components: `tokenizer`, `text_encoder` (UMT5), `image_encoder` (`CLIPVisionModel`), `audio_encoder`
    (`Wav2Vec2Model`), `feature_extractor` (`Wav2Vec2FeatureExtractor`), `transformer`
    (`SkyReelsV3Transformer3DModel`, avatar config), `vae` (`AutoencoderKLWan`), `scheduler`
    (`SkyReelsV3FlowEulerScheduler`, shift 11).

    Beyond the original (defaults keep its behaviour): `window_prompt=None` uses the user prompt in every window
    (the original always uses "a person is talking"); `clip_from_reference=True` takes CLIP tokens from the portrait
    in every window (the original uses the first motion frame); 540P has a bucket table; `resume_dir` lets a killed
    run resume at the next window with an identical result; frames are rounded (not truncated) to uint8; the output
    carries the user's original audio by default (`output_audio="normalized"` for the original's -23 LUFS track).
    `reproduce_original=True` truncates to uint8 as the original and returns the normalised track.
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->audio_encoder->transformer->vae"

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        image_encoder: CLIPVisionModel,
        audio_encoder: Wav2Vec2Model,
        feature_extractor: Wav2Vec2FeatureExtractor,
        transformer: SkyReelsV3Transformer3DModel,
        vae: AutoencoderKLWan,
        scheduler: SkyReelsV3FlowEulerScheduler,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            image_encoder=image_encoder,
            audio_encoder=audio_encoder,
            feature_extractor=feature_extractor,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
        )
        self._set_vae_scale_factors()

    # ---------------------------------------------------------------------------------------------- inputs
    @classmethod
    def check_inputs(
        cls,
        image,
        audio=None,
        audio_sample_rate=None,
        audio_embeds=None,
        prompt=None,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        resolution: str = "480P",
        height=None,
        width=None,
        num_inference_steps=4,
        guidance_scale=1.0,
        audio_guidance_scale=1.0,
        max_audio_seconds=DEFAULT_MAX_SECONDS,
        output_type="np",
        output_audio="original",
        callback_on_step_end_tensor_inputs=None,
        resume_dir=None,
    ) -> None:
        """Validate every argument before any model work (needs no weights: a classmethod)."""
        if image is None:
            raise PipelineInputError("image", "is required.")
        check_size(height, width)
        if height is None:
            avatar_bucket_size(1, 1, resolution)  # validates `resolution`
        check_guidance_scale("audio_guidance_scale", audio_guidance_scale)
        if output_audio not in (None, "original", "normalized"):  # None: the default of `reproduce_original`
            raise PipelineInputError("output_audio", f"must be 'original' or 'normalized', got {output_audio!r}.")
        if not isinstance(max_audio_seconds, (int, float)) or not 0 < max_audio_seconds <= DEFAULT_MAX_SECONDS:
            raise PipelineInputError(
                "max_audio_seconds", f"must be in (0, {DEFAULT_MAX_SECONDS:g}] seconds, got {max_audio_seconds!r}."
            )
        if output_type == "latent" and resume_dir is not None:
            raise PipelineInputError(
                "output_type",
                "='latent' cannot be combined with `resume_dir` (finished windows are kept as frames, not latents).",
            )
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
        if (audio is None) == (audio_embeds is None):
            raise PipelineInputError("audio", "or `audio_embeds` (wav2vec2 features) is required, not both.")
        if audio_embeds is not None:
            if audio_embeds.ndim != 3 or len(audio_embeds) < 1:
                raise PipelineInputError("audio_embeds", f"must be [T, layers, dim], got {tuple(audio_embeds.shape)}.")
            if len(audio_embeds) > max_audio_seconds * VIDEO_FPS:
                raise PipelineInputError(
                    "audio_embeds",
                    f"covers {len(audio_embeds) / VIDEO_FPS:.1f} s, over the "
                    f"limit of {max_audio_seconds:g} s (`max_audio_seconds`).",
                )

    @staticmethod
    def load_inputs(
        image, audio, audio_sample_rate, audio_embeds, max_audio_seconds: float
    ) -> tuple[PIL.Image.Image, SpeechAudio | None, int]:
        """The portrait, the decoded speech (None with `audio_embeds`) and the number of video frames."""
        portrait = load_image(image, name="image", exif_transpose=True)
        if audio_embeds is not None:
            return portrait, None, len(audio_embeds)
        speech = (
            audio
            if isinstance(audio, SpeechAudio)
            else load_speech(audio, audio_sample_rate, max_seconds=max_audio_seconds, name="audio")
        )
        if speech.duration > max_audio_seconds:
            raise PipelineInputError(
                "audio",
                f"is {speech.duration:.1f} s long, over the limit of {max_audio_seconds:g} s (`max_audio_seconds`).",
            )
        return portrait, speech, speech.num_frames

    def prepare_portrait(self, portrait: PIL.Image.Image, height: int, width: int) -> torch.Tensor:
        """Resize to cover (bilinear, sizes rounded up) and centre-crop to (height, width), like the original;
        returns `[1, 3, 1, H, W]` in [-1, 1]."""
        scale = max(height / portrait.height, width / portrait.width)
        size = (math.ceil(scale * portrait.width), math.ceil(scale * portrait.height))
        resized = portrait.resize(size, PIL.Image.BILINEAR)
        top, left = int(round((size[1] - height) / 2.0)), int(round((size[0] - width) / 2.0))
        cropped = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32) / 255.0
        return (torch.from_numpy(cropped).permute(2, 0, 1)[None, :, None] - 0.5) * 2

    def encode_prompts(
        self,
        prompt,
        negative_prompt,
        window_prompt,
        prompt_embeds,
        negative_prompt_embeds,
        window_prompt_embeds,
        guidance: bool,
        max_sequence_length: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """UMT5 embeddings of the user prompt (the keyframe clip), the negative prompt (the original's English one by
        default; with text guidance only) and the window prompt (the user prompt when `window_prompt` is None)."""
        device = self._execution_device
        negative_prompt = negative_prompt if negative_prompt is not None else NEGATIVE_PROMPT
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            guidance,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
            device=device,
        )
        if window_prompt_embeds is None:
            window_prompt_embeds = (
                prompt_embeds
                if window_prompt is None
                else self.encode_prompt(window_prompt, max_sequence_length=max_sequence_length, device=device)[0]
            )
        return prompt_embeds, negative_prompt_embeds, window_prompt_embeds

    def encode_image(self, frame: torch.Tensor) -> torch.Tensor:
        """CLIP tokens of a `[1, 3, H, W]` frame in [-1, 1]: stretched to the encoder's size (bicubic, no crop),
        CLIP-normalised, penultimate layer -> `[1, 257, width]`."""
        device = get_module_execution_device(self.image_encoder)
        size = self.image_encoder.config.image_size
        pixels = F.interpolate(frame.float().to(device), size=(size, size), mode="bicubic", align_corners=False)
        pixels = pixels * 0.5 + 0.5
        mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
        pixels = ((pixels - mean) / std).to(self.image_encoder.dtype)
        return self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]

    def encode_audio(self, speech: SpeechAudio) -> torch.Tensor:
        """wav2vec2 features of the loudness-normalised 16-kHz waveform at 25 fps: `[T, layers, dim]`."""
        return wav2vec2_features(self.audio_encoder, self.feature_extractor, speech.normalized, speech.num_frames)

    # ---------------------------------------------------------------------------------------------- one clip
    def prepare_condition(self, condition: torch.Tensor, pseudo: torch.Tensor | None) -> torch.Tensor:
        """`y` = [mask (4) | condition latents (16)] `[1, 20, 21, h, w]` of an 81-frame conditioning video:
        `condition` `[n, 3, H, W]` first frames, `pseudo` `[5, 3, H, W]` end frames (or None), zeros (grey) between."""
        device = self._execution_device
        num_cond, (_, height, width) = condition.shape[0], condition.shape[1:]
        video = torch.zeros(1, 3, WINDOW_FRAMES, height, width, device=device)
        video[0, :, :num_cond] = condition.transpose(0, 1).to(device)
        num_pseudo = 0 if pseudo is None else pseudo.shape[0]
        if pseudo is not None:
            video[0, :, -num_pseudo:] = pseudo.transpose(0, 1).to(device)
        condition_latents = self.encode_video(video).to(device)  # [1, 16, 21, h, w]
        h, w = condition_latents.shape[-2:]
        mask = torch.zeros(1, WINDOW_FRAMES, h, w, device=device)
        mask[:, :num_cond] = 1
        if num_pseudo:
            mask[:, -num_pseudo:] = 1
        scale = self.vae_scale_factor_temporal
        mask = torch.cat([mask[:, :1].repeat_interleave(scale, dim=1), mask[:, 1:]], dim=1)
        mask = mask.view(1, -1, scale, h, w).transpose(1, 2)  # [1, 4, 21, h, w]
        return torch.cat([mask, condition_latents], dim=1)

    def renoise_motion(
        self,
        latents: torch.Tensor,
        motion_latents: torch.Tensor,
        noise_level: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        """Motion latents (the first latent frames) re-noised to `noise_level` with a fresh draw (the original's)."""
        noise = randn_tensor(motion_latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
        latents = latents.clone()
        latents[:, :, : motion_latents.shape[2]] = self.scheduler.add_noise_at(motion_latents, noise, noise_level)
        return latents

    def predict_avatar_noise(
        self, step: int, run: AvatarRun, text_embeds: torch.Tensor, audio: torch.Tensor, **model_inputs
    ) -> torch.Tensor:
        """The flow prediction with the original's text / audio guidance combinations (float32)."""

        def branch(name: str, embeds: torch.Tensor, sound: torch.Tensor) -> torch.Tensor:
            return self.run_transformer(
                name, step, encoder_hidden_states=embeds, audio_embeds=sound, **model_inputs
            ).float()

        cond = branch("cond", text_embeds, audio)
        text_on, audio_on, negative = (
            self.guidance_scale > 1.0,
            run.audio_guidance_scale > 1.0,
            run.negative_prompt_embeds,
        )
        if text_on and audio_on:
            uncond = branch("uncond", negative, torch.zeros_like(audio))
            uncond_text = branch("uncond_text", negative, audio)
            return (
                uncond + self.guidance_scale * (cond - uncond_text) + run.audio_guidance_scale * (uncond_text - uncond)
            )
        if text_on:
            uncond_text = branch("uncond_text", negative, audio)
            return uncond_text + self.guidance_scale * (cond - uncond_text)
        if audio_on:
            uncond_audio = branch("uncond_audio", text_embeds, torch.zeros_like(audio))
            return uncond_audio + run.audio_guidance_scale * (cond - uncond_audio)
        return cond

    def generate_clip(
        self,
        run: AvatarRun,
        condition: torch.Tensor,
        pseudo: torch.Tensor | None,
        text_embeds: torch.Tensor,
        audio_start: int,
        features: torch.Tensor,
        motion: bool,
    ) -> torch.Tensor:
        """Denoise and decode one 81-frame clip; returns its frames `[81, 3, H, W]` in [-1, 1]."""
        device, dtype = self._execution_device, self.transformer.dtype
        clip_from_portrait = not motion or run.clip_from_reference
        image_embeds = (run.image_embeds if clip_from_portrait else self.encode_image(condition[:1])).to(device, dtype)
        y = self.prepare_condition(condition, pseudo)
        audio = audio_windows(features, audio_start, WINDOW_FRAMES).to(device, dtype)[None]
        latents = randn_tensor(
            (1, y.shape[1] - 4, *y.shape[2:]), generator=run.generator, device=device, dtype=torch.float32
        )  # the shape of the condition latents
        self.scheduler.set_timesteps(
            run.num_inference_steps, device=device, sigmas=run.sigmas, timesteps=run.timesteps
        )
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        motion_latents = y[:, 4:, : 1 + (MOTION_FRAMES - 1) // self.vae_scale_factor_temporal] if motion else None
        if motion:
            latents = self.renoise_motion(latents, motion_latents, timesteps[0], run.generator)
        self.scheduler.set_begin_index(0)
        watch = FiniteWatch()
        for i, t in enumerate(timesteps):
            if self.interrupt:
                continue
            self._current_timestep = t
            noise_pred = self.predict_avatar_noise(
                i,
                run,
                text_embeds,
                audio,
                hidden_states=torch.cat([latents, y], dim=1).to(dtype),
                timestep=t.expand(latents.shape[0]).float(),
                encoder_hidden_states_image=image_embeds,
            )
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if motion:
                level = self.scheduler.sigmas[i + 1] * self.scheduler.config.num_train_timesteps
                latents = self.renoise_motion(latents, motion_latents, level, run.generator)
            if run.callback_on_step_end is not None:
                callback_kwargs = {
                    "latents": latents,
                    "prompt_embeds": text_embeds,
                    "negative_prompt_embeds": run.negative_prompt_embeds,
                }
                callback_kwargs = {k: callback_kwargs[k] for k in run.callback_on_step_end_tensor_inputs}
                latents = (run.callback_on_step_end(self, i, t, callback_kwargs) or {}).pop("latents", latents)
            watch.update(latents, i)
        self._current_timestep = None
        watch.check()
        run.clip_latents.append(latents)
        return self.decode_latents(latents)[0].transpose(0, 1)  # [81, 3, H, W]

    # ---------------------------------------------------------------------------------------------- windows
    def to_uint8(self, run: AvatarRun, pixels: torch.Tensor) -> np.ndarray:
        """`[F, 3, H, W]` in [-1, 1] -> uint8 `[F, H, W, 3]` (rounded; the original's `(x + 1) * 127.5` truncated
        with `reproduce_original`)."""
        if run.reproduce_original:
            return ((pixels.permute(0, 2, 3, 1).float() + 1) * 127.5).clamp(0, 255).cpu().numpy().astype(np.uint8)
        return pixels_to_uint8(pixels.permute(0, 2, 3, 1))

    def generate_windows(
        self,
        run: AvatarRun,
        plan: WindowPlan,
        keyframe_video: torch.Tensor,
        start: tuple[int, torch.Tensor | None, list[np.ndarray]],
        store: ResumeStore | None,
        callback_on_window_end: Callable | None,
    ) -> list[np.ndarray]:
        """The sliding windows after the keyframe clip; returns every window's new uint8 frames."""
        next_window, motion_frames, chunks = start
        features = extend_audio(run.audio_embeds, plan.video_length)
        keyframes = [keyframe_video[i] for i in plan.keyframes]
        num_windows = len(plan.starts)
        with self.progress_bar(total=num_windows) as progress_bar:
            progress_bar.update(next_window)
            for k in range(next_window, num_windows):
                if self.interrupt:
                    break
                last = plan.starts[k] + WINDOW_FRAMES == plan.video_length
                pseudo = keyframes[min(k, len(keyframes) - 1)][None].repeat(PSEUDO_FRAMES, 1, 1, 1)
                condition = run.reference[None] if k == 0 else motion_frames
                frames = self.generate_clip(
                    run, condition, pseudo, run.window_prompt_embeds, plan.starts[k], features, motion=k > 0
                )
                if not last:
                    frames = frames[: WINDOW_FRAMES - DROP_FRAMES]
                frames = match_colors(frames, run.reference, run.color_match_strength)
                chunks.append(self.to_uint8(run, frames if k == 0 else frames[condition.shape[0] :]))
                motion_frames = frames[-MOTION_FRAMES:]
                if store is not None:
                    store.save_window(k, chunks[-1])
                    store.save_state(
                        keyframe_video=keyframe_video.cpu(),
                        next_window=k + 1,
                        motion=motion_frames.cpu(),
                        generator=run.generator.get_state(),
                    )
                progress_bar.update()
                if callback_on_window_end is not None:
                    callback_on_window_end(self, k + 1, num_windows + 1)
        return chunks

    def keyframe_clip(
        self, run: AvatarRun, store: ResumeStore | None, callback_on_window_end: Callable | None, num_windows: int
    ) -> torch.Tensor:
        """The first clip, on the user prompt, colour-matched to the portrait."""
        keyframe_video = match_colors(
            self.generate_clip(run, run.reference[None], None, run.prompt_embeds, 0, run.audio_embeds, motion=False),
            run.reference,
            run.color_match_strength,
        )
        if store is not None:
            store.save_state(
                keyframe_video=keyframe_video.cpu(), next_window=0, motion=None, generator=run.generator.get_state()
            )
        if callback_on_window_end is not None:
            callback_on_window_end(self, 0, num_windows + 1)
        return keyframe_video

    # ---------------------------------------------------------------------------------------------- call
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        audio: str | os.PathLike | np.ndarray | SpeechAudio | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        audio_sample_rate: int | None = None,
        resolution: str = "480P",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 4,
        sigmas: list[float] | None = None,
        timesteps: list[float] | None = None,
        guidance_scale: float = 1.0,
        audio_guidance_scale: float = 1.0,
        window_prompt: str | None = DEFAULT_WINDOW_PROMPT,
        clip_from_reference: bool = False,
        color_match_strength: float = 1.0,
        max_audio_seconds: float = DEFAULT_MAX_SECONDS,
        generator: torch.Generator | None = None,
        prompt_embeds: torch.Tensor | None = None,
        window_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        audio_embeds: torch.Tensor | None = None,
        resume_dir: str | os.PathLike | None = None,
        write_resume: bool = True,
        output_type: str = "np",
        output_audio: str | None = None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        callback_on_window_end: Callable[[Any, int, int], None] | None = None,
        max_sequence_length: int = 512,
        reproduce_original: bool = False,
    ) -> SkyReelsV3AvatarPipelineOutput | tuple:
        r"""
        Animate `image` speaking `audio`.

        Args:
            image: the portrait (path or PIL; EXIF orientation applied); picks the resolution bucket.
            audio: speech: a file (wav, mp3, flac, m4a, ...), a waveform with `audio_sample_rate`, or a decoded
                `SpeechAudio`; mono 16 kHz, normalised to -23 LUFS for the features. 0.4 s to `max_audio_seconds`.
            prompt: describes the person and scene; drives the keyframe clip (and every window with
                `window_prompt=None`).
            negative_prompt: used with guidance (default: the original's English negative prompt).
            audio_sample_rate: sample rate of a waveform `audio`.
            resolution: "480P" (default), "540P" or "720P" avatar bucket table.
            height, width: explicit size (multiples of 16), overriding the bucket.
            num_inference_steps: Euler steps per clip (4).
            sigmas: custom unshifted noise levels per clip (in (0, 1]; the scheduler applies its shift and appends 0).
            timesteps: the same as timesteps (`1000 * sigmas`).
            guidance_scale, audio_guidance_scale: text and audio guidance (1.0 = off, the original's defaults).
            window_prompt: prompt of the sliding windows ("a person is talking", the original's); None = `prompt`.
            clip_from_reference: CLIP tokens from the portrait in every window (default False: from the first
                motion frame, as the original).
            color_match_strength: Lab colour matching to the portrait after every clip (1.0 = the original).
            max_audio_seconds: longest accepted audio (at most 200 s).
            generator: draws all noise (clip noise and motion re-noising, in the original's order).
            prompt_embeds, window_prompt_embeds, negative_prompt_embeds: precomputed UMT5 embeddings.
            image_embeds: precomputed CLIP tokens of the portrait `[1, 257, 1280]` (used wherever the portrait's
                tokens are: the keyframe clip, the first window, and every window with `clip_from_reference`).
            audio_embeds: precomputed wav2vec2 features `[T, 12, 768]` at 25 fps instead of `audio`.
            resume_dir: folder for per-window checkpoints; a run killed at window k and started again with the same
                inputs resumes at window k and gives the same video as an uninterrupted run.
            write_resume: whether this process writes the checkpoints (when several processes run the same call,
                one of them writes; all of them read).
            output_type: "np" (default), "pil", "pt" or "latent" (every clip's final latents; not with `resume_dir`).
            output_audio: "original" (the user's file; the default) or "normalized" (-23 LUFS, 16 kHz mono; the
                default with `reproduce_original`).
            return_dict: return a `SkyReelsV3AvatarPipelineOutput` instead of a tuple.
            attention_kwargs: passed to the transformer.
            callback_on_step_end: `fn(pipe, step, timestep, tensors) -> dict` after every step of every clip.
            callback_on_step_end_tensor_inputs: names from `_callback_tensor_inputs` passed to it.
            callback_on_window_end: `fn(pipe, window, num_windows)` after every finished window (0 = keyframe clip).
            max_sequence_length: text tokens (512).
            reproduce_original: the original's conventions (uint8 by truncation, the normalised audio track).

        Examples:
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        output_audio = output_audio or ("normalized" if reproduce_original else "original")

        # 1. Check inputs, load the portrait and the speech (before any model work)
        self.check_inputs(
            image,
            audio,
            audio_sample_rate,
            audio_embeds,
            prompt,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            resolution,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            audio_guidance_scale,
            max_audio_seconds,
            output_type,
            output_audio,
            callback_on_step_end_tensor_inputs,
            resume_dir,
        )
        portrait, speech, num_frames = self.load_inputs(
            image, audio, audio_sample_rate, audio_embeds, max_audio_seconds
        )
        if height is None:
            height, width = avatar_bucket_size(portrait.height, portrait.width, resolution)
        self._start_call(guidance_scale, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))

        # 2. Encode the prompts (the user prompt drives the keyframe clip), the portrait and the speech
        prompt_embeds, negative_prompt_embeds, window_prompt_embeds = self.encode_prompts(
            prompt,
            negative_prompt,
            window_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            window_prompt_embeds,
            guidance_scale > 1.0,
            max_sequence_length,
        )
        reference = self.prepare_portrait(portrait, height, width).to(device)[0, :, 0]  # [3, H, W]
        run = AvatarRun(
            reference,
            prompt_embeds,
            window_prompt_embeds,
            negative_prompt_embeds if guidance_scale > 1.0 or audio_guidance_scale > 1.0 else None,
            self.encode_image(reference[None]) if image_embeds is None else image_embeds,
            (self.encode_audio(speech) if audio_embeds is None else audio_embeds).float(),
            generator,
            num_inference_steps,
            sigmas,
            timesteps,
            audio_guidance_scale,
            clip_from_reference,
            color_match_strength,
            reproduce_original,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )

        # 3. The keyframe clip, then the sliding windows (resuming an interrupted run where it stopped)
        plan = plan_windows(num_frames)
        video = self.generate_video(
            run, plan, resume_dir, write_resume, [height, width, guidance_scale], callback_on_window_end
        )

        # 4. Output
        if output_type == "latent":
            output = torch.stack(run.clip_latents, dim=1)  # [1, clips, C, F, h, w]
        else:
            output = self.format_frames(torch.from_numpy(video).float().div(255).permute(0, 1, 4, 2, 3), output_type)
        waveform, rate = None, None
        if speech is not None:
            waveform, rate = (
                (speech.source, speech.source_rate) if output_audio == "original" else (speech.normalized, 16000)
            )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (output, waveform, rate)
        return SkyReelsV3AvatarPipelineOutput(frames=output, audio=waveform, audio_sample_rate=rate)

    def generate_video(
        self,
        run: AvatarRun,
        plan: WindowPlan,
        resume_dir,
        write_resume: bool,
        settings: list,
        callback_on_window_end: Callable | None,
    ) -> np.ndarray:
        """Keyframe clip + windows -> uint8 `[1, F, H, W, 3]`, resuming from `resume_dir` when it holds a state."""
        store, state = None, None
        if resume_dir is not None:
            store = ResumeStore(resume_dir, self._resume_fingerprint(run, settings), writer=write_resume)
            state = store.load()
        num_windows = len(plan.starts)
        if state is None:
            keyframe_video = self.keyframe_clip(run, store, callback_on_window_end, num_windows)
            start = (0, None, [])
        else:
            device = self._execution_device
            keyframe_video = state["keyframe_video"].to(device)
            motion = state["motion"].to(device) if state["motion"] is not None else None
            run.generator.set_state(state["generator"])
            start = (state["next_window"], motion, store.windows(state["next_window"]))
        if not plan.starts:
            return self.to_uint8(run, keyframe_video[: plan.num_frames])[None]
        chunks = self.generate_windows(run, plan, keyframe_video, start, store, callback_on_window_end)
        height, width = keyframe_video.shape[-2:]
        video = np.concatenate(chunks) if chunks else np.zeros((0, height, width, 3), np.uint8)  # interrupted
        return video[: plan.num_frames][None]

    def _resume_fingerprint(self, run: AvatarRun, settings: list) -> str:
        """Everything that changes the frames: inputs, embeddings, seed state, settings, schedule, weights."""
        return fingerprint(
            run.audio_embeds,
            run.reference,
            run.prompt_embeds,
            run.window_prompt_embeds,
            run.image_embeds,
            run.negative_prompt_embeds,
            run.generator.get_state(),
            [
                *settings,
                run.num_inference_steps,
                run.audio_guidance_scale,
                run.clip_from_reference,
                run.color_match_strength,
                dict(self.scheduler.config),
                run.sigmas,
                run.timesteps,
                run.reproduce_original,
                self._attention_kwargs,
                str(self._execution_device.type),
                module_identity(self.transformer),
                module_identity(self.vae),
            ],
        )
