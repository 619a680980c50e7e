"""SkyReels-V3 diffusion transformer: one Wan2.1-style model family for all four SkyReels-V3 tasks.

The three original checkpoints differ only in configuration:

* reference-to-video: 16 input channels, one timestep per sample; the pipeline appends the reference latents as
  extra latent frames.
* video extension (single shot and shot switching): one timestep per latent frame (`timestep` `[B, F_total]`,
  0 on condition frames) and, for shot switching, `condition_hidden_states` appended after the video tokens with
  RoPE temporal positions from `condition_rope_offset` (1024) on.
* talking avatar: 36 input channels (noise | mask | condition latents), 257 CLIP image tokens through dual
  cross-attention (`image_dim`, `added_kv_proj_dim`), a per-block audio cross-attention in which the tokens of
  each latent frame attend only to that frame's audio tokens, and the audio projection (`audio_in_dim`, ...).

Numerics: weights in the compute dtype (bf16) except `_keep_in_fp32_modules`; LayerNorms, modulation, gates and
the residual stream inside a block run in float32 with one rounding at the block end; q/k RMSNorm and RoPE run in
float32 with one rounding before attention; the time sinusoid is computed in float64 (a `[B*F, 256]` tensor) and
RoPE tables in float64 on the host, cached per shape. In float32 this is the original math; in bf16 it rounds
no more often than any of the three originals.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Sequence

import torch
import torch.nn as nn
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.loaders import PeftAdapterMixin
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import PixArtAlphaTextProjection, TimestepEmbedding
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanImageEmbedding
from diffusers.utils import apply_lora_scale
from diffusers.utils.torch_utils import maybe_allow_in_graph

from ..loaders.single_file import SkyReelsV3SingleFileMixin
from .attention_processor import SkyReelsV3Attention, SkyReelsV3AttnProcessor, SkyReelsV3AudioAttention
from .audio_projection import SkyReelsV3AudioProjection


def timestep_sinusoid(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """`[cos(t * w_k), sin(t * w_k)]` with `w_k = max_period ** (-k / (dim / 2))`, computed in float64.

    float64 keeps the arguments (up to 1000 rad) exact enough that the result is the correctly rounded value; it is
    a `[N, dim]` tensor, negligible next to one block. Devices without float64 (MPS) fall back to float32.
    """
    compute_dtype = torch.float32 if timestep.device.type == "mps" else torch.float64
    half = dim // 2
    exponent = torch.arange(half, dtype=compute_dtype, device=timestep.device) / half
    freqs = torch.pow(torch.tensor(max_period, dtype=compute_dtype, device=timestep.device), -exponent)
    args = timestep.to(compute_dtype)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


def linear_compute_dtype(linear: nn.Module, fallback: torch.dtype) -> torch.dtype:
    """The dtype a linear layer computes in: its weight's, or for quantised storage (GGUF's uint8 blocks) the
    layer's `compute_dtype` (else `fallback`)."""
    if linear.weight.is_floating_point():
        return linear.weight.dtype
    return getattr(linear, "compute_dtype", None) or fallback


def _per_frame(tensor: torch.Tensor, num_groups: int) -> torch.Tensor:
    """View `[B, L, D]` tokens as `[B, G, L/G, D]` frame groups (G = 1: one group for the whole sequence)."""
    return tensor.unflatten(1, (num_groups, -1))


def modulate(hidden_states: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x * (1 + scale) + shift` with per-group `[B, G, D]` modulation on `[B, L, D]` tokens (no `[B, L, D]` copies
    of the modulation are materialised)."""
    groups = shift.shape[1]
    out = _per_frame(hidden_states, groups) * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)
    return out.flatten(1, 2)


def gated_add(residual: torch.Tensor, update: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """`residual + update * gate` in float32 with a per-group `[B, G, D]` gate."""
    groups = gate.shape[1]
    out = _per_frame(residual, groups) + _per_frame(update.float(), groups) * gate.unsqueeze(2)
    return out.flatten(1, 2)


class SkyReelsV3RotaryPosEmbed(nn.Module):
    """3-D RoPE over (frame, row, column) with explicit temporal positions.

    The head dim splits into `t = d - 4 * (d // 6)` temporal and `2 * (d // 6)` row and column channels (44/42/42
    for d = 128); each adjacent channel pair rotates with `pos * theta ** (-2k / axis_dim)`. Video frames take
    temporal positions `0..F-1`; condition items (shot switching) take `offset + S_j ...` where `S_j` counts the
    condition frames before item j, and reuse the video's (row, column) grid. Tables are computed in float64 on the
    host once per shape, expanded on the device and cached (a handful of shapes per run).

    Returns `(cos, sin)`, each `[1, L, 1, d]` float32.
    """

    _cache_size = 4

    def __init__(self, attention_head_dim: int, theta: float = 10000.0, condition_offset: int = 1024):
        super().__init__()
        self.attention_head_dim = attention_head_dim
        self.theta = theta
        self.condition_offset = condition_offset
        h_dim = w_dim = 2 * (attention_head_dim // 6)
        self.axis_dims = (attention_head_dim - h_dim - w_dim, h_dim, w_dim)
        self._cache: OrderedDict = OrderedDict()

    def _axis_table(self, positions: torch.Tensor, axis_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim))
        angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
        cos = angles.cos().repeat_interleave(2, dim=1).float()
        sin = angles.sin().repeat_interleave(2, dim=1).float()
        return cos, sin

    def forward(
        self, num_frames: int, height: int, width: int, condition_frames: Sequence[int] = (), device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (num_frames, height, width, tuple(condition_frames), str(device))
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached

        frame_positions = [torch.arange(num_frames)]
        start = self.condition_offset
        for frames in condition_frames:
            frame_positions.append(torch.arange(start, start + frames))
            start += frames
        frame_positions = torch.cat(frame_positions)
        total_frames = frame_positions.numel()

        tables = [
            self._axis_table(frame_positions, self.axis_dims[0]),
            self._axis_table(torch.arange(height), self.axis_dims[1]),
            self._axis_table(torch.arange(width), self.axis_dims[2]),
        ]
        grid = (total_frames, height, width)
        outputs = []
        for part in (0, 1):  # cos, sin
            f, h, w = (t[part].to(device) for t in tables)
            full = torch.cat(
                [
                    f.view(total_frames, 1, 1, -1).expand(*grid, -1),
                    h.view(1, height, 1, -1).expand(*grid, -1),
                    w.view(1, 1, width, -1).expand(*grid, -1),
                ],
                dim=-1,
            )
            outputs.append(full.reshape(1, total_frames * height * width, 1, -1))
        result = (outputs[0], outputs[1])
        self._cache[key] = result
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return result


class SkyReelsV3ConditionEmbedder(nn.Module):
    """Time, text and (optional) CLIP-image embeddings; parameter names follow diffusers' Wan embedder.

    `timestep` is `[B]` (one per sample) or `[B, T]` (one per latent frame). Returns `temb` `[B, T, D]` (head
    modulation), `timestep_proj` `[B, T, 6, D]` (block modulation), the projected text and image tokens; `T` is 1
    for per-sample timesteps.
    """

    def __init__(self, dim: int, time_freq_dim: int, text_embed_dim: int, image_embed_dim: int | None = None):
        super().__init__()
        self.time_freq_dim = time_freq_dim
        self.time_embedder = TimestepEmbedding(in_channels=time_freq_dim, time_embed_dim=dim)
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, dim * 6)
        self.text_embedder = PixArtAlphaTextProjection(text_embed_dim, dim, act_fn="gelu_tanh")
        self.image_embedder = WanImageEmbedding(image_embed_dim, dim) if image_embed_dim is not None else None

    def forward(
        self,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
    ):
        if timestep.ndim == 1:
            timestep = timestep[:, None]
        batch_size, groups = timestep.shape
        sinusoid = timestep_sinusoid(timestep.flatten(), self.time_freq_dim)
        embedder_dtype = linear_compute_dtype(self.time_embedder.linear_1, sinusoid.dtype)
        temb = self.time_embedder(sinusoid.to(embedder_dtype))
        timestep_proj = self.time_proj(self.act_fn(temb).to(linear_compute_dtype(self.time_proj, temb.dtype)))
        temb = temb.unflatten(0, (batch_size, groups))
        timestep_proj = timestep_proj.unflatten(0, (batch_size, groups)).unflatten(2, (6, -1))

        text_dtype = linear_compute_dtype(self.text_embedder.linear_1, encoder_hidden_states.dtype)
        encoder_hidden_states = self.text_embedder(encoder_hidden_states.to(text_dtype))
        if encoder_hidden_states_image is not None:
            if self.image_embedder is None:
                raise ValueError("`encoder_hidden_states_image` was given but this model has no `image_dim`.")
            encoder_hidden_states_image = self.image_embedder(encoder_hidden_states_image.to(text_dtype))
        return temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image


class SkyReelsV3FrameModulation(nn.Module):
    """Identity on the per-frame time embeddings (`temb` `[B, F, D]`, `timestep_proj` `[B, F, 6, D]`).

    It exists so that context parallelism can declare, in `_cp_plan`, that per-frame modulation is split along frames
    together with the tokens (each rank then modulates exactly the frames whose tokens it holds)."""

    def forward(self, temb: torch.Tensor, timestep_proj: torch.Tensor):
        return temb, timestep_proj


@maybe_allow_in_graph
class SkyReelsV3TransformerBlock(nn.Module):
    """norm -> modulate -> self-attention -> gate; norm -> cross-attention (text [+ image]); [norm -> audio
    cross-attention]; norm -> modulate -> FFN -> gate. Residual stream in float32 inside the block."""

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        cross_attn_norm: bool = True,
        eps: float = 1e-6,
        added_kv_proj_dim: int | None = None,
        audio_dim: int | None = None,
        audio_norm_input: bool = True,
    ):
        super().__init__()
        head_dim = dim // num_heads
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn1 = SkyReelsV3Attention(
            dim=dim, heads=num_heads, dim_head=head_dim, eps=eps, processor=SkyReelsV3AttnProcessor()
        )
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.attn2 = SkyReelsV3Attention(
            dim=dim,
            heads=num_heads,
            dim_head=head_dim,
            eps=eps,
            added_kv_proj_dim=added_kv_proj_dim,
            cross_attention_dim_head=head_dim,
            processor=SkyReelsV3AttnProcessor(),
        )
        if audio_dim is not None:
            self.norm_audio = FP32LayerNorm(dim, eps, elementwise_affine=True) if audio_norm_input else nn.Identity()
            self.attn_audio = SkyReelsV3AudioAttention(dim, audio_dim, num_heads, head_dim)
        else:
            self.norm_audio = self.attn_audio = None
        self.ffn = FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        encoder_hidden_states_image: torch.Tensor | None = None,
        audio_hidden_states: torch.Tensor | None = None,
        tokens_per_frame: int | None = None,
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        # temb: [B, G, 6, D] -> six [B, G, D] modulation vectors (G frame groups; 1 = uniform)
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table.float() + temb.float()
        ).unbind(2)

        residual = hidden_states.float()
        norm_hidden_states = modulate(self.norm1(residual), shift_msa, scale_msa).to(dtype)
        attn_output = self.attn1(norm_hidden_states, rotary_emb=rotary_emb)
        residual = gated_add(residual, attn_output, gate_msa)

        norm_hidden_states = self.norm2(residual).to(dtype)
        attn_output = self.attn2(
            norm_hidden_states, encoder_hidden_states, encoder_hidden_states_image=encoder_hidden_states_image
        )
        residual = residual + attn_output.float()

        if self.attn_audio is not None and audio_hidden_states is not None:
            norm_hidden_states = self.norm_audio(residual).to(dtype)
            residual = (
                residual
                + self.attn_audio(norm_hidden_states, audio_hidden_states, tokens_per_frame=tokens_per_frame).float()
            )

        norm_hidden_states = modulate(self.norm3(residual), c_shift_msa, c_scale_msa).to(dtype)
        ff_output = self.ffn(norm_hidden_states)
        residual = gated_add(residual, ff_output, c_gate_msa)
        return residual.to(dtype)


TransformerBlockRegistry.register(
    model_class=SkyReelsV3TransformerBlock,
    metadata=TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
)


class SkyReelsV3Transformer3DModel(
    ModelMixin, ConfigMixin, PeftAdapterMixin, CacheMixin, AttentionMixin, SkyReelsV3SingleFileMixin
):
    r"""
    The SkyReels-V3 video diffusion transformer (Wan2.1 architecture with per-frame timesteps, appended condition
    tokens, dual text/image cross-attention and per-frame audio cross-attention, each switched on by config).

    Args:
        patch_size (`tuple[int, int, int]`, defaults to `(1, 2, 2)`): 3-D patch (t, h, w) of the patch embedding.
        num_attention_heads (`int`, defaults to 40): attention heads.
        attention_head_dim (`int`, defaults to 128): channels per head; the width is heads x head dim (5120).
        in_channels (`int`, defaults to 16): input latent channels (16; 36 for the talking avatar: noise, mask,
            condition latents).
        out_channels (`int`, defaults to 16): output latent channels.
        text_dim (`int`, defaults to 4096): width of the text encoder (UMT5-XXL) tokens.
        freq_dim (`int`, defaults to 256): width of the timestep sinusoid.
        ffn_dim (`int`, defaults to 13824): hidden width of the feed-forward layers.
        num_layers (`int`, defaults to 40): transformer blocks.
        cross_attn_norm (`bool`, defaults to True): affine LayerNorm before the cross-attention.
        qk_norm (`str`, defaults to `"rms_norm_across_heads"`): q/k normalisation (the only supported kind).
        eps (`float`, defaults to 1e-6): epsilon of the block norms.
        image_dim (`int`, *optional*): width of CLIP image tokens (1280 for the avatar); enables the image embedder.
        added_kv_proj_dim (`int`, *optional*): enables the image key/value projections of the cross-attention.
        condition_rope_offset (`int`, defaults to 1024): first RoPE temporal position of `condition_hidden_states`.
        audio_in_dim (`int`, *optional*): wav2vec2 width (768); enables the audio projection and audio attention.
        audio_in_layers (`int`, defaults to 12): wav2vec2 layers per audio frame.
        audio_window (`int`, defaults to 5): audio frames per video frame window.
        audio_vae_scale (`int`, defaults to 4): video frames per latent frame (VAE temporal factor).
        audio_intermediate_dim (`int`, defaults to 512): hidden width of the audio projection.
        audio_dim (`int`, defaults to 768): width of the audio tokens.
        audio_context_tokens (`int`, defaults to 32): audio tokens per latent frame.
        audio_norm_output (`bool`, defaults to True): LayerNorm on the audio tokens.
        audio_norm_input (`bool`, defaults to True): affine LayerNorm on the visual tokens before audio attention.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["patch_embedding", "condition_embedder", "audio_proj", "norm"]
    _no_split_modules = ["SkyReelsV3TransformerBlock"]
    _keep_in_fp32_modules = [
        "time_embedder",
        "time_proj",
        "scale_shift_table",
        "norm1",
        "norm2",
        "norm3",
        "norm_audio",
        "norm_out",
    ]
    _repeated_blocks = ["SkyReelsV3TransformerBlock"]
    _cp_plan = {
        "rope": {
            0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
            1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
        },
        "blocks.0": {
            "hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
        },
        # per-frame timesteps (extension): modulation split along frames, like the tokens (needs F % degree == 0)
        "frame_modulation": {
            0: ContextParallelInput(split_dim=1, expected_dims=3, split_output=True),
            1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
        },
        # text, CLIP and audio tokens stay whole on every rank; the audio attention finds each local token's frame
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        condition_rope_offset: int = 1024,
        audio_in_dim: int | None = None,
        audio_in_layers: int = 12,
        audio_window: int = 5,
        audio_vae_scale: int = 4,
        audio_intermediate_dim: int = 512,
        audio_dim: int = 768,
        audio_context_tokens: int = 32,
        audio_norm_output: bool = True,
        audio_norm_input: bool = True,
    ) -> None:
        super().__init__()
        if qk_norm != "rms_norm_across_heads":
            raise ValueError(f"`qk_norm` must be 'rms_norm_across_heads', got {qk_norm!r}.")
        inner_dim = num_attention_heads * attention_head_dim

        self.rope = SkyReelsV3RotaryPosEmbed(attention_head_dim, condition_offset=condition_rope_offset)
        self.patch_embedding = nn.Conv3d(in_channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        self.condition_embedder = SkyReelsV3ConditionEmbedder(inner_dim, freq_dim, text_dim, image_dim)
        self.frame_modulation = SkyReelsV3FrameModulation()
        self.audio_proj = (
            SkyReelsV3AudioProjection(
                in_dim=audio_in_dim,
                num_layers=audio_in_layers,
                window=audio_window,
                vae_scale=audio_vae_scale,
                intermediate_dim=audio_intermediate_dim,
                out_dim=audio_dim,
                context_tokens=audio_context_tokens,
                norm_output=audio_norm_output,
            )
            if audio_in_dim is not None
            else None
        )
        self.blocks = nn.ModuleList(
            [
                SkyReelsV3TransformerBlock(
                    inner_dim,
                    ffn_dim,
                    num_attention_heads,
                    cross_attn_norm=cross_attn_norm,
                    eps=eps,
                    added_kv_proj_dim=added_kv_proj_dim,
                    audio_dim=audio_dim if audio_in_dim is not None else None,
                    audio_norm_input=audio_norm_input,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm_out = FP32LayerNorm(inner_dim, eps, elementwise_affine=False)
        self.proj_out = nn.Linear(inner_dim, out_channels * math.prod(patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, inner_dim) / inner_dim**0.5)
        self.gradient_checkpointing = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' `from_pretrained`, made strict: a checkpoint with missing, unexpected or mismatched keys
        raises `ValueError` naming them instead of leaving parameters randomly initialised."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        problems = {name: info.get(name) for name in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {name: keys for name, keys in problems.items() if keys}
        if problems:
            details = "; ".join(
                f"{name.replace('_', ' ')}: {sorted(map(str, keys))}" for name, keys in problems.items()
            )
            raise ValueError(f"Checkpoint {pretrained_model_name_or_path} does not match {cls.__name__}: {details}")
        return (model, info) if output_loading_info else model

    def _patchify(self, latents: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype))
        return tokens.flatten(2).transpose(1, 2)

    def _check_inputs(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        audio_embeds: torch.Tensor | None,
        condition_hidden_states: torch.Tensor | Sequence[torch.Tensor] | None,
    ) -> tuple[list[torch.Tensor], int]:
        """Shape checks of `forward`'s inputs; returns the condition latents as a list and the number of
        context-parallel ranks the tokens are split over."""
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        if num_frames % p_t or height % p_h or width % p_w:
            raise ValueError(
                f"`hidden_states` frames/height/width ({num_frames}, {height}, {width}) must be multiples of the "
                f"patch size {tuple(self.config.patch_size)}."
            )
        if condition_hidden_states is None:
            conditions = []
        elif isinstance(condition_hidden_states, torch.Tensor):
            conditions = [condition_hidden_states]
        else:
            conditions = list(condition_hidden_states)
        for condition in conditions:
            if condition.ndim != 5 or condition.shape[0] != batch_size or condition.shape[3:] != (height, width):
                raise ValueError(
                    "`condition_hidden_states` must be [B, C, F_c, H, W] with the batch size and spatial size of "
                    f"`hidden_states` {tuple(hidden_states.shape)}, got {tuple(condition.shape)}."
                )
        post_f = num_frames // p_t
        total_frames = post_f + sum(condition.shape[2] // p_t for condition in conditions)
        parallel = self._parallel_config.context_parallel_config if self._parallel_config is not None else None
        ranks = parallel._flattened_mesh.size() if parallel is not None else 1
        num_tokens = total_frames * (height // p_h) * (width // p_w)
        if num_tokens % ranks and not (parallel.ulysses_anything or parallel.ring_anything):
            raise ValueError(
                f"{num_tokens} tokens cannot be split evenly over {ranks} context-parallel ranks with the current "
                "parallel configuration (Ulysses or ring alone split any count; combined or swapped-in processors "
                "need a count divisible by the degree)."
            )
        if timestep.ndim == 2 and timestep.shape[1] not in (1, total_frames):
            raise ValueError(
                f"`timestep` of shape {tuple(timestep.shape)} must be [B] or [B, F_total] with F_total = "
                f"{total_frames} latent frames (video + condition)."
            )
        if (self.audio_proj is None) != (audio_embeds is None):
            raise ValueError(
                "`audio_embeds` must be given exactly when the model has an audio branch (`audio_in_dim`)."
            )
        if audio_embeds is not None and (
            self.audio_proj.num_latent_frames(audio_embeds.shape[1]) != post_f or audio_embeds.shape[0] != batch_size
        ):
            raise ValueError(
                f"`audio_embeds` must be [B, {self.config.audio_vae_scale}*(F-1)+1, ...] for F = {post_f} latent "
                f"frames, got {tuple(audio_embeds.shape)}."
            )
        return conditions, ranks

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        audio_embeds: torch.Tensor | None = None,
        condition_hidden_states: torch.Tensor | Sequence[torch.Tensor] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `[B, C, F, H, W]`):
                Video latents (C = `in_channels`): the noisy latents, with the reference frames already concatenated
                along time (reference-to-video), the condition frames prepended (single-shot extension), or the
                mask and condition latents concatenated along channels (talking avatar).
            timestep (`torch.Tensor` of shape `[B]` or `[B, F_total]`):
                Diffusion timesteps (integer or float). `[B, F_total]` gives one timestep per latent frame, where
                `F_total` counts the frames of `hidden_states` followed by those of `condition_hidden_states`
                (extension models: 0 on condition frames).
            encoder_hidden_states (`torch.Tensor` of shape `[B, L_text, text_dim]`):
                Text-encoder tokens (UMT5-XXL, 512 tokens, zero past the prompt length).
            encoder_hidden_states_image (`torch.Tensor` of shape `[B, 257, image_dim]`, *optional*):
                CLIP image tokens (penultimate layer) for models with `image_dim` (talking avatar).
            audio_embeds (`torch.Tensor` of shape `[B, 4F-3, window, layers, audio_in_dim]`, *optional*):
                For each video frame, the window of wav2vec2 features around it (5 audio frames of the 12 layers of
                width 768); required by models with `audio_in_dim` (talking avatar).
            condition_hidden_states (`torch.Tensor` or list of `torch.Tensor` of shape `[B, C, F_c, H, W]`, *optional*):
                Condition latents for shot switching: patch-embedded separately, appended after the video tokens,
                RoPE temporal positions from `condition_rope_offset` on, on the (h, w) grid of `hidden_states`. Their
                outputs are dropped.
            attention_kwargs (`dict`, *optional*):
                `{"scale": s}` scales LoRA layers.
            return_dict (`bool`, defaults to True):
                Return a `Transformer2DModelOutput` instead of a tuple.

        Returns:
            `Transformer2DModelOutput` whose `sample` is `[B, out_channels, F, H, W]` (the video part only) in the
            compute dtype, or a 1-tuple with that tensor.
        """
        batch_size = hidden_states.shape[0]
        p_t, p_h, p_w = self.config.patch_size
        conditions, ranks = self._check_inputs(hidden_states, timestep, audio_embeds, condition_hidden_states)
        post_f, post_h, post_w = (size // patch for size, patch in zip(hidden_states.shape[2:], (p_t, p_h, p_w)))
        condition_frames = [condition.shape[2] // p_t for condition in conditions]

        rotary_emb = self.rope(post_f, post_h, post_w, condition_frames, device=hidden_states.device)
        hidden_states = torch.cat([self._patchify(x) for x in [hidden_states, *conditions]], dim=1).contiguous()

        temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        if temb.shape[1] > 1:
            if temb.shape[1] % ranks:
                raise ValueError(
                    f"Per-frame timesteps over {temb.shape[1]} latent frames cannot be split evenly over "
                    f"{ranks} context-parallel ranks; use a frame count divisible by it."
                )
            temb, timestep_proj = self.frame_modulation(temb, timestep_proj)
        audio_hidden_states = self.audio_proj(audio_embeds) if audio_embeds is not None else None

        block_args = (
            encoder_hidden_states,
            timestep_proj,
            rotary_emb,
            encoder_hidden_states_image,
            audio_hidden_states,
            post_h * post_w,
        )
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states, *block_args)
            else:
                hidden_states = block(hidden_states, *block_args)

        shift, scale = (self.scale_shift_table.float() + temb.float().unsqueeze(2)).unbind(2)
        hidden_states = modulate(self.norm_out(hidden_states.float()), shift, scale).to(hidden_states.dtype)
        hidden_states = self.proj_out(hidden_states)

        hidden_states = hidden_states[:, : post_f * post_h * post_w]
        hidden_states = hidden_states.reshape(batch_size, post_f, post_h, post_w, p_t, p_h, p_w, -1)
        output = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
