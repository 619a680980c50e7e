"""Attention modules and processors of the SkyReels-V3 transformer.

Every processor prepares query/key/value in the `(batch, seq, heads, head_dim)` layout and calls diffusers'
`dispatch_attention_fn`, so `set_attention_backend(...)` and context parallelism (`enable_parallelism`) reach all
of them. Each processor class carries the two attributes that contract relies on: `_attention_backend` and
`_parallel_config`. A different kernel or parallel scheme is a different processor, never a patched forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttention

from .attention_backends import cross_attention_backend


def rms_norm_fp32(hidden_states: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    """RMS-normalise over the last dim in float32 and multiply by the weight, returning float32.

    Rounding to the compute dtype is left to the caller so that normalisation and RoPE round only once (the
    extension original keeps this chain in float32; rounding earlier only adds error).
    """
    x = hidden_states.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    return x * norm.weight.float()


def apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent (even, odd) channel pairs of `[B, L, H, D]` by real cos/sin tables of shape `[1, L, 1, D]`.

    The tables hold each frequency twice (repeat-interleaved); the math runs in float32 and the result stays in
    float32.
    """
    x = hidden_states.float()
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class SkyReelsV3AttnProcessor:
    """Self- and cross-attention of a SkyReels-V3 block (`attn1`, `attn2`).

    * q/k RMSNorm across all heads and 3-D RoPE are computed in float32 and rounded to the compute dtype once,
      right before the attention kernel.
    * The image branch of the talking-avatar model (dual cross-attention) receives the CLIP tokens as a separate
      argument (`encoder_hidden_states_image`) instead of splitting a concatenated context at a hard-coded text
      length; its output is added to the text attention output before `to_out`.
    * Self-attention passes the model's parallel config (context parallelism); cross-attention attends from the
      local query shard to the full, replicated text/image tokens and passes none.
    * With a lossy backend (`fa3_fp8`, `triton_8bit`), only self-attention runs on it; cross-attentions use an
      exact one (`cross_attention_backend`: `fa3` for `fa3_fp8`, `native` SDPA for the Triton kernels).
    """

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        is_self_attention = encoder_hidden_states is None
        context = hidden_states if is_self_attention else encoder_hidden_states

        if getattr(attn, "fused_projections", False):
            if is_self_attention:
                query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
            else:
                query = attn.to_q(hidden_states)
                key, value = attn.to_kv(context).chunk(2, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)

        query = rms_norm_fp32(query, attn.norm_q).unflatten(2, (attn.heads, -1))
        key = rms_norm_fp32(key, attn.norm_k).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_rotary_emb(query, *rotary_emb)
            key = apply_rotary_emb(key, *rotary_emb)
        query, key = query.to(dtype), key.to(dtype)

        if is_self_attention:
            hidden_states = self.self_attention(query, key, value, attention_mask)
        else:
            hidden_states = dispatch_attention_fn(
                query,
                key,
                value,
                attn_mask=attention_mask,
                backend=cross_attention_backend(self._attention_backend),
                parallel_config=None,
            )
        hidden_states = hidden_states.flatten(2, 3)

        if encoder_hidden_states_image is not None:
            if getattr(attn, "fused_projections", False):
                key_img, value_img = attn.to_added_kv(encoder_hidden_states_image).chunk(2, dim=-1)
            else:
                key_img = attn.add_k_proj(encoder_hidden_states_image)
                value_img = attn.add_v_proj(encoder_hidden_states_image)
            key_img = rms_norm_fp32(key_img, attn.norm_added_k).to(dtype).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = dispatch_attention_fn(
                query,
                key_img,
                value_img,
                backend=cross_attention_backend(self._attention_backend),
                parallel_config=None,
            ).flatten(2, 3)
            hidden_states = hidden_states + hidden_states_img

        hidden_states = attn.to_out[0](hidden_states.to(dtype))
        return attn.to_out[1](hidden_states)

    def self_attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The self-attention kernel on `(batch, seq, heads, head_dim)` tensors (under context parallelism: this
        rank's token shard, exchanged as the model's parallel config says)."""
        return dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )


class SkyReelsV3USPAttnProcessor(SkyReelsV3AttnProcessor):
    """`SkyReelsV3AttnProcessor` whose self-attention runs through an external unified sequence-parallel (USP)
    kernel, e.g. xDiT's `xFuserLongContextAttention` (`skyreels_diffusers.parallel.enable_xfuser_parallel` swaps it
    in): `attention(query, key, value)` takes and returns this rank's `(batch, seq / N, heads, head_dim)` shard and
    does the Ulysses all-to-all / ring exchange itself. Cross-attention and everything around the kernel are
    unchanged; the token split and gather stay declared in the model's `_cp_plan`."""

    def __init__(self, attention):
        self.attention = attention

    def self_attention(self, query, key, value, attention_mask):
        if attention_mask is not None:
            raise ValueError("The USP (xfuser) self-attention takes no attention mask.")
        return self.attention(query, key, value)


class SkyReelsV3Attention(WanAttention):
    """diffusers' `WanAttention` (same parameters and state-dict names) with the SkyReels-V3 processor."""

    _default_processor_cls = SkyReelsV3AttnProcessor
    _available_processors = [SkyReelsV3AttnProcessor, SkyReelsV3USPAttnProcessor]

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.processor(self, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)


class SkyReelsV3AudioAttnProcessor:
    """Per-latent-frame audio cross-attention of the talking-avatar model.

    The visual tokens of latent frame `f` (queries) attend only to the audio tokens of frame `f` (keys/values). On
    a whole sequence the token axis is regrouped as `[B * frames, tokens_per_frame]` (one batched attention call).
    Under context parallelism a rank holds a contiguous slice of the tokens that may start and end inside a frame:
    its tokens are cut into at most three runs (the end of a frame, whole frames, the start of a frame), each
    attending to its own frames' audio tokens without a mask, so every query sees the keys, in the order, that it
    sees in one process (the same bits, where a masked call over all touched frames differed by float rounding). No
    q/k norm and no RoPE (single speaker), exactly like the original.
    """

    _attention_backend = None
    _parallel_config = None

    def _shard_offset(self, seq_len: int, total: int) -> int:
        """Index of this rank's first token in the whole sequence (diffusers shards with `tensor_split`)."""
        if seq_len == total:
            return 0
        mesh = self._parallel_config.context_parallel_config._flattened_mesh
        world, rank = mesh.size(), mesh.get_local_rank()
        sizes = [total // world + (1 if r < total % world else 0) for r in range(world)]
        if sizes[rank] != seq_len:
            raise ValueError(f"Cannot place a shard of {seq_len} tokens of {total} on rank {rank} of {world}.")
        return sum(sizes[:rank])

    def __call__(
        self,
        attn: "SkyReelsV3AudioAttention",
        hidden_states: torch.Tensor,
        audio_hidden_states: torch.Tensor,
        tokens_per_frame: int | None = None,
    ) -> torch.Tensor:
        batch_size, seq_len, _ = hidden_states.shape
        num_frames = audio_hidden_states.shape[1]
        tokens_per_frame = tokens_per_frame or seq_len // num_frames
        total = num_frames * tokens_per_frame
        sharded = self._parallel_config is not None and seq_len != total
        if not sharded and seq_len != total:
            raise ValueError(
                f"The token count {seq_len} is not {num_frames} frames of {tokens_per_frame} tokens; the audio "
                "attention needs the same number of tokens in every frame."
            )
        query = attn.to_q(hidden_states)
        offset = self._shard_offset(seq_len, total) if sharded else 0
        outputs = [
            self._attend(attn, query[:, start:end], audio_hidden_states[:, first:last], hidden_states.dtype)
            for start, end, first, last in frame_runs(offset, seq_len, tokens_per_frame)
        ]
        hidden_states = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)

    def _attend(
        self, attn: "SkyReelsV3AudioAttention", query: torch.Tensor, audio: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """Queries `[B, n * t, inner]` of `n` consecutive frames (t tokens each) on those frames' audio tokens
        `[B, n, A, audio_dim]`: one attention call over `B * n` frames -> `[B, n * t, inner]` in `dtype` (the
        hidden states')."""
        batch_size, num_tokens, _ = query.shape
        num_frames = audio.shape[1]
        query = query.reshape(batch_size * num_frames, num_tokens // num_frames, attn.heads, -1)
        audio = audio.flatten(0, 1).to(dtype)
        if getattr(attn, "fused_projections", False):
            key, value = attn.to_kv(audio).chunk(2, dim=-1)
        else:
            key, value = attn.to_k(audio), attn.to_v(audio)
        key, value = key.unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1))
        hidden_states = dispatch_attention_fn(
            query, key, value, backend=cross_attention_backend(self._attention_backend), parallel_config=None
        )
        return hidden_states.reshape(batch_size, num_tokens, -1).to(dtype)


def frame_runs(offset: int, seq_len: int, tokens_per_frame: int) -> list[tuple[int, int, int, int]]:
    """Tokens `offset ... offset + seq_len` of a sequence of frames of `tokens_per_frame` tokens, cut into runs that
    each hold part of one frame or whole frames: `(start, end, first_frame, last_frame + 1)`, start and end local
    (0 = the token at `offset`). The whole sequence is one run of whole frames."""
    begin, stop = offset, offset + seq_len
    head_end = min(stop, -(-begin // tokens_per_frame) * tokens_per_frame)  # the first frame boundary >= begin
    body_end = head_end + (stop - head_end) // tokens_per_frame * tokens_per_frame
    cuts = [(a, b) for a, b in ((begin, head_end), (head_end, body_end), (body_end, stop)) if b > a]
    return [(a - offset, b - offset, a // tokens_per_frame, (b - 1) // tokens_per_frame + 1) for a, b in cuts]


class SkyReelsV3AudioAttention(nn.Module, AttentionModuleMixin):
    """Cross-attention from visual tokens (width `dim`) to audio tokens (width `audio_dim`), frame by frame."""

    _default_processor_cls = SkyReelsV3AudioAttnProcessor
    _available_processors = [SkyReelsV3AudioAttnProcessor]

    def __init__(self, dim: int, audio_dim: int, heads: int, dim_head: int, processor=None):
        super().__init__()
        self.heads = heads
        self.inner_dim = heads * dim_head
        self.to_q = nn.Linear(dim, self.inner_dim, bias=True)
        self.to_k = nn.Linear(audio_dim, self.inner_dim, bias=True)
        self.to_v = nn.Linear(audio_dim, self.inner_dim, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, dim, bias=True), nn.Dropout(0.0)])
        # what diffusers' `fuse_projections` reads: key and value (from the audio tokens) fuse into one `to_kv`
        self.is_cross_attention, self.use_bias, self.fused_projections = True, True, False
        self.set_processor(processor if processor is not None else self._default_processor_cls())

    def forward(self, hidden_states: torch.Tensor, audio_hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.processor(self, hidden_states, audio_hidden_states, **kwargs)
