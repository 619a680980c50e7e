"""The 8-bit Triton attention kernel (`skyreels_diffusers.kernels.attention_8bit`) as diffusers attention backends.

    pipe.transformer.set_attention_backend("triton_8bit")           # INT8 Q·K, FP8 P·V (fast, lossy)
    pipe.transformer.set_attention_backend("triton_8bit_accurate")  # INT8 Q·K, bf16 P·V

Importing this module (the package does) registers both names with diffusers' attention registry, so
`set_attention_backend`, diffusers' `attention_backend(...)` context manager, the CLI's `--attention-backend` and
`GenerationRequest.attention_backend` accept them. The backend runs the kernel on self-attention (query and key
of one length, no mask, head dim 64/128, bf16/fp16) and hands every other call to diffusers' `native` backend
unchanged (PyTorch SDPA); the SkyReels-V3 processors also send their cross-attentions to `native` explicitly
(`attention_backends.cross_attention_backend`), since a text cross-attention can have as many tokens as the video.

Context parallelism: the backend is registered as supporting it. Under Ulysses, diffusers' templated attention
hands the kernel the full sequence of this rank's heads (the kernel's K mean and scales are then those of the
whole sequence, as without parallelism). Ring attention merges partial results by their log-sum-exp, which the
kernel does not return: it raises a clear error there. Inference only: there is no backward.

diffusers names its backends in an `Enum` (`AttentionBackendName`), and an `Enum` has no public way to grow;
`_add_backend_name` adds the two members the way `Enum` stores its own (member map, value map, class attribute),
and `_AttentionBackendRegistry.register` (diffusers' own decorator) does the rest. Nothing of diffusers is replaced.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
    _templated_context_parallel_attention,
)


ATTENTION_8BIT = "triton_8bit"
ATTENTION_8BIT_ACCURATE = "triton_8bit_accurate"
# backend name -> (Q·K precision, P·V precision, Hadamard-rotated Q/K) of the kernel
BACKENDS = {ATTENTION_8BIT: ("int8", "fp8", False), ATTENTION_8BIT_ACCURATE: ("int8", "bf16", False)}


def _add_backend_name(name: str) -> AttentionBackendName:
    """`AttentionBackendName(name)`, adding the member first if diffusers does not define it."""
    if name in AttentionBackendName._value2member_map_:
        return AttentionBackendName(name)
    member = str.__new__(AttentionBackendName, name)
    member._name_, member._value_ = name.upper(), name
    member._sort_order_ = len(AttentionBackendName._member_names_)
    type.__setattr__(AttentionBackendName, member._name_, member)
    AttentionBackendName._member_map_[member._name_] = member
    AttentionBackendName._member_names_.append(member._name_)
    AttentionBackendName._value2member_map_[name] = member
    return member


def check_8bit_backend_available(name: str) -> None:
    """Raise a clear error, before any model loads, where the 8-bit backend `name` cannot run: it needs Triton and
    a CUDA GPU with FP8 (compute capability 8.9+), or Triton's CPU interpreter (`TRITON_INTERPRET=1`)."""
    if name not in BACKENDS:
        return
    try:
        from ..kernels.attention_8bit import interpreter_mode
    except ImportError as error:
        raise ImportError(
            f"attention backend {name!r} needs Triton: pip install 'skyreels-diffusers[triton]' ({error})"
        ) from None
    if interpreter_mode():
        return
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"attention backend {name!r} needs a CUDA GPU (FP8: compute capability 8.9+, fast on "
            "Hopper); without one use the default backend (or TRITON_INTERPRET=1 for tests)"
        )
    if torch.cuda.get_device_capability() < (8, 9):
        raise RuntimeError(
            f"attention backend {name!r} needs FP8 tensor cores (compute capability 8.9+), this "
            f"GPU has {torch.cuda.get_device_capability()}"
        )


def _runs_kernel(query, key, value, attn_mask, dropout_p: float, is_causal: bool, enable_gqa: bool) -> bool:
    return (
        attn_mask is None
        and not is_causal
        and dropout_p == 0.0
        and not enable_gqa
        and query.shape == key.shape == value.shape
        and query.shape[-1] in (64, 128)
        and query.dtype in (torch.bfloat16, torch.float16)
    )


def register_inference_backend(name: str, run, takes, *, returns_lse: bool, takes_what: str):
    """Register `name` with diffusers' attention registry as an inference-only backend that supports context
    parallelism: `run(query, key, value, scale, return_lse)` computes the calls `takes(query, key, value, attn_mask,
    dropout_p, is_causal, enable_gqa)` accepts (and, unless `returns_lse`, that ask for no log-sum-exp); diffusers'
    `native` backend gets every other call unchanged. Under context parallelism diffusers' templated attention calls
    `run` on the exchanged tensors (Ulysses: this rank's heads over the whole sequence; ring: one key/value chunk at a
    time, with `return_lse`), and refuses a call it cannot take, saying it takes `takes_what`."""

    def forward_op(
        ctx,
        query,
        key,
        value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
        return_lse=False,
        _save_ctx=True,
        _parallel_config=None,
    ):
        if return_lse and not returns_lse:
            raise NotImplementedError(
                f"attention backend {name!r} returns no log-sum-exp, which ring attention "
                "needs: use Ulysses (--ulysses-degree) with it, or another backend for ring"
            )
        if not takes(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
            raise ValueError(f"attention backend {name!r} under context parallelism takes {takes_what}")
        return run(query, key, value, scale, return_lse)

    def backward_op(ctx, grad_out, *args, **kwargs):
        raise NotImplementedError(f"attention backend {name!r} is inference-only (no backward)")

    @_AttentionBackendRegistry.register(_add_backend_name(name), supports_context_parallel=True)
    def attention(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
        return_lse: bool = False,
        _parallel_config=None,
    ) -> torch.Tensor:
        if not takes(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa) or (
            return_lse and not returns_lse
        ):
            native = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]
            return native(
                query,
                key,
                value,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
                return_lse=return_lse,
                _parallel_config=_parallel_config,
            )
        if _parallel_config is None:
            return run(query, key, value, scale, return_lse)
        return _templated_context_parallel_attention(
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            scale,
            enable_gqa,
            return_lse,
            forward_op=forward_op,
            backward_op=backward_op,
            _parallel_config=_parallel_config,
        )

    attention.__name__ = f"_{name}_attention"
    return attention


def _make_backend(name: str):
    qk, pv, rotate = BACKENDS[name]

    def run(query, key, value, scale, return_lse: bool):
        from ..kernels import attention_8bit  # noqa: F401  (registers torch.ops.skyreels.attention_8bit)

        return torch.ops.skyreels.attention_8bit(query, key, value, scale, qk, pv, rotate)

    return register_inference_backend(name, run, _runs_kernel, returns_lse=False, takes_what="self-attention only")


for _name in BACKENDS:
    if _add_backend_name(_name) not in _AttentionBackendRegistry._backends:
        _make_backend(_name)
