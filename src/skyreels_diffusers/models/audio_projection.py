"""Audio projection of the talking-avatar model: wav2vec2 windows -> per-latent-frame audio tokens."""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.normalization import FP32LayerNorm


class SkyReelsV3AudioProjection(nn.Module):
    """Turns per-video-frame wav2vec2 windows into `context_tokens` audio tokens per latent frame.

    Input `audio_embeds` is `[B, T, window, layers, in_dim]` with `T = vae_scale * (F - 1) + 1` video frames for
    `F` latent frames (each video frame carries the window of audio frames around it, e.g. 5 frames of the 12
    wav2vec2 layers of width 768). The first video frame forms latent frame 0 on its own (its whole window). Every
    later latent frame groups `vae_scale` video frames and keeps the first frame's window up to the centre, the
    centre entry of the middle frames and the last frame's window from the centre on, giving
    `window + vae_scale - 1` entries (8 for a window of 5 and scale 4). Two first projections (one per case),
    ReLU, a second projection, ReLU, and a projection to `context_tokens * out_dim`, then LayerNorm.

    Output: `[B, F, context_tokens, out_dim]`.
    """

    def __init__(
        self,
        in_dim: int = 768,
        num_layers: int = 12,
        window: int = 5,
        vae_scale: int = 4,
        intermediate_dim: int = 512,
        out_dim: int = 768,
        context_tokens: int = 32,
        norm_output: bool = True,
    ):
        super().__init__()
        self.window = window
        self.vae_scale = vae_scale
        self.context_tokens = context_tokens
        self.out_dim = out_dim
        latter_window = window + vae_scale - 1
        self.linear_first = nn.Linear(window * num_layers * in_dim, intermediate_dim)
        self.linear_latter = nn.Linear(latter_window * num_layers * in_dim, intermediate_dim)
        self.linear_2 = nn.Linear(intermediate_dim, intermediate_dim)
        self.linear_3 = nn.Linear(intermediate_dim, context_tokens * out_dim)
        self.norm_out = FP32LayerNorm(out_dim, eps=1e-5) if norm_output else nn.Identity()

    def num_latent_frames(self, num_video_frames: int) -> int:
        return (num_video_frames - 1) // self.vae_scale + 1

    def forward(self, audio_embeds: torch.Tensor) -> torch.Tensor:
        batch_size, num_video_frames = audio_embeds.shape[:2]
        if (num_video_frames - 1) % self.vae_scale != 0:
            raise ValueError(
                f"`audio_embeds` must hold {self.vae_scale}*(F-1)+1 video frames for F latent frames, got "
                f"{num_video_frames}."
            )
        dtype = self.linear_first.weight.dtype if self.linear_first.weight.is_floating_point() else audio_embeds.dtype
        audio_embeds = audio_embeds.to(dtype)
        centre = self.window // 2

        first = audio_embeds[:, :1].flatten(2)
        latter = audio_embeds[:, 1:].unflatten(1, (-1, self.vae_scale))  # [B, F-1, scale, window, layers, dim]
        latter = torch.cat(
            [
                latter[:, :, 0, : centre + 1],
                latter[:, :, 1:-1, centre],
                latter[:, :, -1, centre:],
            ],
            dim=2,
        ).flatten(2)

        hidden_states = torch.cat(
            [torch.relu(self.linear_first(first)), torch.relu(self.linear_latter(latter))], dim=1
        )
        hidden_states = torch.relu(self.linear_2(hidden_states))
        hidden_states = self.linear_3(hidden_states).unflatten(-1, (self.context_tokens, self.out_dim))
        return self.norm_out(hidden_states)
