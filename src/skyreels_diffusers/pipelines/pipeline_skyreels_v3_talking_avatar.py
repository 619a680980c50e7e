"""SkyReels-V3 talking avatar: portrait + speech -> lip-synced video (25 fps) with the audio.

A run is a keyframe clip followed by sliding windows, all made by one loop (`generate_windows`): `pipe(...)` returns
the whole video, `pipe.windows(...)` the same run as an iterable of finished windows (uint8 frames as they come, for
writing a long video while it is generated without holding it in memory, and for resuming a killed run with
`pipelines.resume.resumable_windows`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

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
    OUTPUT_TYPES,
    FiniteWatch,
    PipelineInputError,
    SkyReelsV3PipelineMixin,
    check_common_inputs,
    check_guidance_scale,
)
from .resume import check_resume_folder, fingerprint, module_identity, resumable_windows
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
        >>> from skyreels_diffusers.pipelines.video_io import GrowingVideoWriter, write_video

        >>> pipe = SkyReelsV3TalkingAvatarPipeline.from_pretrained("path/to/SkyReels-V3-A2V-diffusers", torch_dtype=torch.bfloat16)
        >>> pipe.vae.to(torch.float32)
        >>> pipe.audio_encoder.to(torch.float32)
        >>> pipe.enable_model_cpu_offload()
        >>> out = pipe(image="portrait.png", audio="speech.wav", prompt="A woman talks to the camera.",
        ...            generator=torch.Generator().manual_seed(42))
        >>> write_video(out.frames[0], "avatar.mp4", fps=out.fps, audio=out.audio, audio_sample_rate=out.audio_sample_rate)

        >>> # a long run, window by window: the mp4 plays while it grows, the frames are never all in memory
        >>> run = pipe.windows(image="portrait.png", audio="speech.wav", prompt="A woman talks to the camera.")
        >>> with GrowingVideoWriter("avatar.partial.mp4", fps=run.fps, audio=run.audio,
        ...                         audio_sample_rate=run.audio_sample_rate) as writer:
        ...     for window in run:
        ...         writer.append(window.frames)
        >>> writer.finish("avatar_long.mp4")
        ```
"""


@dataclass(frozen=True)
class ClipPlan:
    """One pass of the loop: the keyframe clip (`window` None) or sliding window `window`.

    `start` is the clip's first video frame (its audio starts there too); `keep` the decoded frames that are kept
    (colour-matched): new video when `new_video`, else the keyframe clip's frames that end the windows' conditioning
    videos. Only the latent frames those need are decoded (the Wan VAE is causal in time)."""

    index: int  # 0: the keyframe clip; k + 1: sliding window k
    window: int | None
    start: int
    keep: tuple[int, ...]
    new_video: bool

    @property
    def num_decoded(self) -> int:
        return self.keep[-1] + 1


@dataclass
class WindowPlan:
    """How the original covers `num_frames` video frames with 81-frame windows (all counts in video frames)."""

    num_frames: int  # requested (ceil(audio seconds * 25))
    video_length: int  # padded so that the windows tile it exactly
    keyframes: list[int]  # frames of the keyframe clip used as pseudo end frames, one per window
    starts: list[int] = field(default_factory=list)  # window start frames; empty: the keyframe clip is the video
    kept: list[int] = field(default_factory=list)  # frames each window contributes

    def clips(self) -> list[ClipPlan]:
        """The keyframe clip, then every window: what each decodes, keeps and adds to the video. A window keeps its
        first 69 frames (all 81 for the last), of which the 5 motion frames are not new video (after the first
        window); the last window stops at `num_frames`, the keyframe clip keeps the frames the windows use (every
        frame up to `num_frames` when it is the video)."""
        if not self.starts:
            return [ClipPlan(index=0, window=None, start=0, keep=tuple(range(self.num_frames)), new_video=True)]
        keyframes = tuple(sorted(set(self.keyframes)))
        clips = [ClipPlan(index=0, window=None, start=0, keep=keyframes, new_video=False)]
        for k, start in enumerate(self.starts):
            first = 0 if k == 0 else MOTION_FRAMES
            end = min(first + self.kept[k], self.num_frames - start)
            clips.append(ClipPlan(index=k + 1, window=k, start=start, keep=tuple(range(first, end)), new_video=True))
        return clips


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
        return WindowPlan(num_frames=num_frames, video_length=num_frames, keyframes=[])
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
    keyframes = [int(i) for i in mapped[1:]]
    return WindowPlan(num_frames=num_frames, video_length=length, keyframes=keyframes, starts=starts, kept=kept)


def resume_bytes(num_frames: int, height: int, width: int) -> int:
    """About what a run's resume folder holds at its end, in bytes: every window's uint8 frames, the keyframes (one
    float32 frame per window) and the state (the motion frames, twice while it is replaced). 0 without windows (the
    keyframe clip is the video: nothing is saved)."""
    plan = plan_windows(num_frames)
    if not plan.starts:
        return 0
    pixels = height * width * 3
    frames = sum(len(clip.keep) for clip in plan.clips()[1:])
    return frames * pixels + (len(plan.starts) + 2 * MOTION_FRAMES) * pixels * 4


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
class AvatarState:
    """What the clips after a finished one need (saved after every window to resume a killed run)."""

    next_window: int  # the sliding window to make next (0 after the keyframe clip)
    keyframes: torch.Tensor  # [windows, 3, H, W] colour-matched keyframe-clip frames ending each window's condition
    motion: torch.Tensor | None  # [5, 3, H, W] the previous window's last kept frames (None before window 1)
    generator: torch.Tensor  # the generator's state (the next clip's noise is drawn from it)

    def to_dict(self) -> dict[str, Any]:
        """The small part, as plain tensors and numbers (the keyframes are saved once, apart)."""
        motion = None if self.motion is None else self.motion.cpu()
        return {"next_window": self.next_window, "motion": motion, "generator": self.generator}


@dataclass
class AvatarWindow:
    """A finished clip of a run: the frames it adds to the video and how to go on from it.

    `frames` are uint8 `[n, H, W, 3]` (none for a keyframe clip followed by windows), video frames
    `first_frame .. first_frame + n - 1`. `latents` are the clip's final latents and `state` what the next clip
    starts from (both None for a window read back from a resume folder)."""

    index: int  # 0: the keyframe clip; k + 1: sliding window k
    num_clips: int
    window: int | None
    frames: np.ndarray
    first_frame: int
    latents: torch.Tensor | None = None
    state: AvatarState | None = None


@dataclass(kw_only=True, repr=False)
class AvatarRun:
    """One encoded run (from `SkyReelsV3TalkingAvatarPipeline.windows`): iterate it for its `AvatarWindow`s, the
    keyframe clip first. The pipeline makes one run at a time."""

    pipe: Any
    plan: WindowPlan
    reference: torch.Tensor  # [3, H, W] in [-1, 1]
    prompt_embeds: torch.Tensor
    window_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    image_embeds: torch.Tensor
    audio_embeds: torch.Tensor  # [T, layers, dim] float32
    generator: torch.Generator
    initial_generator_state: torch.Tensor
    num_inference_steps: int
    sigmas: list[float] | None
    timesteps: list[float] | None
    guidance_scale: float
    audio_guidance_scale: float
    clip_from_reference: bool
    color_match_strength: float
    reproduce_original: bool
    callback_on_window_end: Callable | None
    audio: np.ndarray | None  # the waveform to mux with the video
    audio_sample_rate: int | None
    fps: int = VIDEO_FPS

    @property
    def height(self) -> int:
        return self.reference.shape[-2]

    @property
    def width(self) -> int:
        return self.reference.shape[-1]

    @property
    def num_frames(self) -> int:
        return self.plan.num_frames

    @property
    def num_clips(self) -> int:
        return len(self.plan.clips())

    def __iter__(self) -> Iterator[AvatarWindow]:
        return self.generate()

    def generate(self, resume_from: AvatarState | None = None) -> Iterator[AvatarWindow]:
        """The finished clips from the start, or from the window after `resume_from`."""
        return self.pipe.generate_windows(self, resume_from)

    def state_from_dict(self, state: dict[str, Any]) -> AvatarState:
        """An `AvatarState` from `AvatarState.to_dict()` plus `keyframes` (as a resume folder holds them)."""
        device = self.pipe._execution_device
        motion = state["motion"]
        return AvatarState(
            next_window=int(state["next_window"]),
            keyframes=state["keyframes"].to(device),
            motion=None if motion is None else motion.to(device),
            generator=state["generator"],
        )

    def restored_window(self, k: int, frames: np.ndarray) -> AvatarWindow:
        """Window `k` as a resume folder holds it (its frames only)."""
        clip = self.plan.clips()[k + 1]
        first_frame = clip.start + clip.keep[0]
        return AvatarWindow(
            index=clip.index, num_clips=self.num_clips, window=k, frames=frames, first_frame=first_frame
        )

    def resume_bytes(self) -> int:
        """About what the run's resume folder holds at its end, in bytes (`resume_bytes`)."""
        return resume_bytes(self.num_frames, self.height, self.width)

    def fingerprint(self) -> str:
        """Everything that changes the frames: inputs, embeddings, seed, settings, schedule, weights."""
        pipe = self.pipe
        settings = [
            self.height,
            self.width,
            self.guidance_scale,
            self.num_inference_steps,
            self.audio_guidance_scale,
            self.clip_from_reference,
            self.color_match_strength,
            dict(pipe.scheduler.config),
            self.sigmas,
            self.timesteps,
            self.reproduce_original,
            pipe._attention_kwargs,
            str(pipe._execution_device.type),
            module_identity(pipe.transformer),
            module_identity(pipe.vae),
        ]
        tensors = (self.audio_embeds, self.reference, self.prompt_embeds, self.window_prompt_embeds)
        extra = (self.image_embeds, self.negative_prompt_embeds, self.initial_generator_state)
        return fingerprint(*tensors, *extra, settings)


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

    Less work around the transformer, with the same frames: only the latent frames whose pixels are kept are
    decoded (the VAE is causal in time: a window's 12 dropped frames are 3 latent frames), and only kept frames are
    colour-matched (the matching is per frame). `windows()` yields each finished window, so a writer can encode
    window k while window k + 1 is generated.
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
        cls.check_output(output_type, resume_dir)
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
        if resume_dir is not None:  # a folder this process can write, with room for the run's files
            num_frames = len(audio_embeds) if audio_embeds is not None else getattr(audio, "num_frames", None)
            known = None not in (num_frames, height, width)
            check_resume_folder(resume_dir, resume_bytes(num_frames, height, width) if known else 0)

    @staticmethod
    def check_output(output_type: str, resume_dir) -> None:
        """`output_type` is one of `OUTPUT_TYPES`, and not "latent" with `resume_dir`."""
        if output_type not in OUTPUT_TYPES:
            raise PipelineInputError("output_type", f"must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if output_type == "latent" and resume_dir is not None:
            raise PipelineInputError(
                "output_type",
                "='latent' cannot be combined with `resume_dir` (finished windows are kept as frames, not latents).",
            )

    @staticmethod
    def load_inputs(
        image, audio, audio_sample_rate, audio_embeds, max_audio_seconds: float, drop_alpha: bool = False
    ) -> tuple[PIL.Image.Image, SpeechAudio | None, int]:
        """The portrait (transparent pixels white, or with `drop_alpha` the colour they hide, as the original's
        `convert("RGB")`), the decoded speech (None with `audio_embeds`) and the number of video frames."""
        portrait = load_image(image, name="image", exif_transpose=True, drop_alpha=drop_alpha)
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

    def denoise(
        self,
        run: AvatarRun,
        y: torch.Tensor,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        audio: torch.Tensor,
        motion: bool,
    ) -> torch.Tensor:
        """The Euler loop of one clip from fresh noise (motion latents re-noised at every level) -> final latents."""
        device, dtype = self._execution_device, self.transformer.dtype
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
            latents = self.step_callback(i, t, latents, text_embeds, run.negative_prompt_embeds)[0]
            watch.update(latents, i)
        self._current_timestep = None
        watch.check()
        return latents

    def generate_clip(
        self, run: AvatarRun, clip: ClipPlan, state: AvatarState | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition, denoise and decode one clip: (its first `clip.num_decoded` frames `[n, 3, H, W]` in [-1, 1],
        its final latents). The keyframe clip and the first window start from the portrait, later windows from the
        previous window's motion frames; windows end on 5 copies of their keyframe."""
        device, dtype = self._execution_device, self.transformer.dtype
        motion = clip.window is not None and clip.window > 0
        condition = state.motion if motion else run.reference[None]
        pseudo = None
        if clip.window is not None:
            keyframe = state.keyframes[min(clip.window, len(state.keyframes) - 1)]
            pseudo = keyframe[None].repeat(PSEUDO_FRAMES, 1, 1, 1)
        clip_from_portrait = not motion or run.clip_from_reference
        image_embeds = (run.image_embeds if clip_from_portrait else self.encode_image(condition[:1])).to(device, dtype)
        y = self.prepare_condition(condition, pseudo)
        features = extend_audio(run.audio_embeds, run.plan.video_length)
        audio = audio_windows(features, clip.start, WINDOW_FRAMES).to(device, dtype)[None]
        text_embeds = run.prompt_embeds if clip.window is None else run.window_prompt_embeds
        latents = self.denoise(run, y, image_embeds, text_embeds, audio, motion)
        num_latents = 1 + math.ceil((clip.num_decoded - 1) / self.vae_scale_factor_temporal)
        pixels = self.decode_latents(latents[:, :, :num_latents])[0].transpose(0, 1)  # causal: the first frames
        return pixels[: clip.num_decoded], latents

    def to_uint8(self, run: AvatarRun, pixels: torch.Tensor) -> np.ndarray:
        """`[F, 3, H, W]` in [-1, 1] -> uint8 `[F, H, W, 3]` (rounded; the original's `(x + 1) * 127.5` truncated
        with `reproduce_original`)."""
        if run.reproduce_original:
            return ((pixels.permute(0, 2, 3, 1).float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).cpu().numpy()
        return pixels_to_uint8(pixels.permute(0, 2, 3, 1))

    def finish_clip(
        self, run: AvatarRun, clip: ClipPlan, pixels: torch.Tensor, latents: torch.Tensor, state: AvatarState | None
    ) -> AvatarWindow:
        """Colour-match the kept frames to the portrait (frame by frame: only those); new video becomes uint8, the
        keyframe clip's kept frames the windows' keyframes; the last kept frames are the next motion frames."""
        kept = match_colors(pixels[list(clip.keep)], run.reference, run.color_match_strength)
        if clip.new_video:
            frames = self.to_uint8(run, kept)
            keyframes = state.keyframes if state is not None else kept[:0]
        else:  # the keyframe clip: the frames that end each window's conditioning video
            frames = np.zeros((0, run.height, run.width, 3), np.uint8)
            keyframes = kept[[clip.keep.index(i) for i in run.plan.keyframes]]
        next_state = AvatarState(
            next_window=0 if clip.window is None else clip.window + 1,
            keyframes=keyframes,
            motion=kept[-MOTION_FRAMES:].clone() if clip.window is not None else None,  # not a view of all
            generator=run.generator.get_state(),
        )
        first_frame = clip.start + clip.keep[0] if clip.new_video else 0
        return AvatarWindow(
            index=clip.index,
            num_clips=run.num_clips,
            window=clip.window,
            frames=frames,
            first_frame=first_frame,
            latents=latents,
            state=next_state,
        )

    # ---------------------------------------------------------------------------------------------- windows
    @torch.no_grad()  # on a generator: every step of the iteration, wherever the caller iterates it
    def generate_windows(self, run: AvatarRun, resume_from: AvatarState | None = None) -> Iterator[AvatarWindow]:
        """The loop of a run: the keyframe clip, then every sliding window (from the one after `resume_from`), each
        yielded when finished; `callback_on_window_end(pipe, index, num_clips)` runs once its consumer is done with
        it (a resume folder saved it, a writer queued it)."""
        clips = run.plan.clips()
        state, first = None, 0
        if resume_from is not None:
            state, first = resume_from, resume_from.next_window + 1
            run.generator.set_state(resume_from.generator)
        with self.progress_bar(total=len(clips)) as progress_bar:
            progress_bar.update(first)
            for clip in clips[first:]:
                if self.interrupt:
                    break
                pixels, latents = self.generate_clip(run, clip, state)
                window = self.finish_clip(run, clip, pixels, latents, state)
                state = window.state
                progress_bar.update()
                yield window
                if run.callback_on_window_end is not None:
                    run.callback_on_window_end(self, clip.index, len(clips))
        self.maybe_free_model_hooks()

    @torch.no_grad()
    def windows(
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
        output_audio: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        callback_on_window_end: Callable[[Any, int, int], None] | None = None,
        max_sequence_length: int = 512,
        reproduce_original: bool = False,
    ) -> AvatarRun:
        r"""
        Check, load and encode the inputs of a run and plan its clips; iterate the returned `AvatarRun` for the
        finished windows (`AvatarWindow`: uint8 frames, their place in the video, the state to go on from).
        Arguments as for `__call__`; nothing is generated until the run is iterated. With
        `pipelines.resume.resumable_windows(run, folder)` a killed run resumes where it stopped.
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
            output_audio=output_audio,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
        portrait, speech, num_frames = self.load_inputs(
            image, audio, audio_sample_rate, audio_embeds, max_audio_seconds, drop_alpha=reproduce_original
        )
        if height is None:
            height, width = avatar_bucket_size(portrait.height, portrait.width, resolution)
        self._start_call(guidance_scale, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs)
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
        reference = self.prepare_portrait(portrait, height, width).to(self._execution_device)[0, :, 0]  # [3, H, W]
        waveform, rate = None, None
        if speech is not None:
            original = output_audio == "original"
            waveform, rate = (speech.source, speech.source_rate) if original else (speech.normalized, 16000)

        # 3. Plan the clips (the keyframe clip, then the sliding windows)
        return AvatarRun(
            pipe=self,
            plan=plan_windows(num_frames),
            reference=reference,
            prompt_embeds=prompt_embeds,
            window_prompt_embeds=window_prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds
            if guidance_scale > 1.0 or audio_guidance_scale > 1.0
            else None,
            image_embeds=self.encode_image(reference[None]) if image_embeds is None else image_embeds,
            audio_embeds=(self.encode_audio(speech) if audio_embeds is None else audio_embeds).float(),
            generator=generator,
            initial_generator_state=generator.get_state(),
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            timesteps=timesteps,
            guidance_scale=guidance_scale,
            audio_guidance_scale=audio_guidance_scale,
            clip_from_reference=clip_from_reference,
            color_match_strength=color_match_strength,
            reproduce_original=reproduce_original,
            callback_on_window_end=callback_on_window_end,
            audio=waveform,
            audio_sample_rate=rate,
        )

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
            resume_dir: folder for per-window checkpoints (`pipelines.resume.resumable_windows`); a run killed at
                window k and started again with the same inputs resumes at window k and gives the same video.
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

        The whole video is returned at once; for long audio, `windows()` gives the same run window by window.

        Examples:
        """
        # 1. Check the output arguments; `windows` checks the others and encodes the inputs (before any generation)
        self.check_output(output_type, resume_dir)
        run = self.windows(
            image,
            audio,
            prompt,
            negative_prompt,
            audio_sample_rate,
            resolution,
            height,
            width,
            num_inference_steps,
            sigmas,
            timesteps,
            guidance_scale,
            audio_guidance_scale,
            window_prompt,
            clip_from_reference,
            color_match_strength,
            max_audio_seconds,
            generator,
            prompt_embeds,
            window_prompt_embeds,
            negative_prompt_embeds,
            image_embeds,
            audio_embeds,
            output_audio,
            attention_kwargs,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
            callback_on_window_end,
            max_sequence_length,
            reproduce_original,
        )

        # 2. The keyframe clip, then the sliding windows (resuming an interrupted run where it stopped)
        windows = iter(run) if resume_dir is None else resumable_windows(run, resume_dir, writer=write_resume)
        chunks, latents = [np.zeros((0, run.height, run.width, 3), np.uint8)], []
        for window in windows:
            chunks.append(window.frames)
            latents.append(window.latents)

        # 3. Output
        if output_type == "latent":
            output = torch.stack(latents, dim=1)  # [1, clips, C, F, h, w]
        else:
            video = np.concatenate(chunks)[None]
            output = self.format_frames(torch.from_numpy(video).float().div(255).permute(0, 1, 4, 2, 3), output_type)
        if not return_dict:
            return (output, run.audio, run.audio_sample_rate)
        return SkyReelsV3AvatarPipelineOutput(frames=output, audio=run.audio, audio_sample_rate=run.audio_sample_rate)
