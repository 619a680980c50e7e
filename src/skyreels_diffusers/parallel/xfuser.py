"""xDiT (xfuser) as an optional sequence-parallel backend: `--parallel-backend xfuser`.

The model is sharded exactly as with diffusers' context parallelism (the `_cp_plan` split/gather hooks: tokens,
RoPE tables, per-frame modulation, the avatar's audio-frame lookup), and each self-attention processor is swapped
for `SkyReelsV3USPAttnProcessor` around xfuser's `xFuserLongContextAttention` (Ulysses all-to-all + ring over
xfuser's process groups, with yunchang's kernels). Nothing is patched; xfuser is imported only here.

xfuser is GPU-only (it needs triton and a CUDA device at import time) and requires the token count to divide by the
degree (it has no uneven all-to-all); the diffusers backend (default) has neither limit.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ..models.attention_processor import SkyReelsV3AttnProcessor, SkyReelsV3USPAttnProcessor
from .context_parallel import apply_cp_plan, check_degrees


INSTALL_HINT = (
    "--parallel-backend xfuser needs xDiT: `pip install xfuser==0.7.0` on a CUDA machine (it also needs triton, "
    "which CUDA builds of torch bring). The default `--parallel-backend diffusers` needs nothing extra."
)


def import_xfuser():
    """Import xfuser's distributed state and USP attention, or raise an `ImportError` saying how to install it."""
    try:
        import yunchang.ring.utils as yunchang_ring_utils

        # xfuser >= 0.5 imports this Ascend-NPU helper, which yunchang 0.6.4 (the newest release) no longer has;
        # it is only used on NPUs.
        if not hasattr(yunchang_ring_utils, "update_npu_out"):
            yunchang_ring_utils.update_npu_out = None
        from xfuser.core.distributed import (
            init_distributed_environment,
            initialize_model_parallel,
            model_parallel_is_initialized,
        )
        from xfuser.core.long_ctx_attention import xFuserLongContextAttention
        from yunchang.kernels import AttnType
    except Exception as error:  # ImportError, or xfuser's NotImplementedError without a GPU
        raise ImportError(f"{INSTALL_HINT} ({type(error).__name__}: {error})") from error
    return (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
        xFuserLongContextAttention,
        AttnType,
    )


def default_attn_type() -> str:
    """flash-attn ("fa", what the original SkyReels-V3 uses) when installed, else PyTorch's cuDNN attention."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "torch_cudnn"
    return "fa"


def enable_usp(model, attention, ulysses_degree: int, ring_degree: int, device: torch.device) -> None:
    """Shard `model` with its `_cp_plan` hooks (even split) and give every self-attention (`attn1`) a
    `SkyReelsV3USPAttnProcessor(attention)`; `attention(q, k, v)` exchanges the shards itself (xfuser's or
    yunchang's long-context attention over their own process groups)."""
    from diffusers import ContextParallelConfig

    for block in model.blocks:
        if type(block.attn1.processor) is not SkyReelsV3AttnProcessor:
            raise ValueError(f"Unexpected self-attention processor {type(block.attn1.processor).__name__}.")
    apply_cp_plan(model, ContextParallelConfig(ulysses_degree=ulysses_degree, ring_degree=ring_degree), device)
    for block in model.blocks:
        block.attn1.set_processor(SkyReelsV3USPAttnProcessor(attention))


def enable_xfuser_parallel(model, ulysses_degree: int = 1, ring_degree: int = 1, attn_type: str | None = None) -> None:
    """Shard `model` over the default process group with xDiT's USP attention (see the module docstring).

    `attn_type` is a yunchang `AttnType` value ("fa", "fa3", "torch_cudnn", "torch_flash", "sage_fp8", ...);
    default: `default_attn_type()`.
    """
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    check_degrees(model.config.num_attention_heads, ulysses_degree, ring_degree, world_size)
    (
        init_distributed_environment,
        initialize_model_parallel,
        model_parallel_is_initialized,
        xFuserLongContextAttention,
        AttnType,
    ) = import_xfuser()
    if not torch.cuda.is_available():
        raise RuntimeError(f"{INSTALL_HINT} No CUDA device is available.")
    init_distributed_environment(rank=dist.get_rank(), world_size=world_size)
    if not model_parallel_is_initialized():
        initialize_model_parallel(
            sequence_parallel_degree=world_size, ulysses_degree=ulysses_degree, ring_degree=ring_degree
        )
    kernel = xFuserLongContextAttention(
        ring_impl_type="basic", attn_type=AttnType.from_string(attn_type or default_attn_type())
    )
    device = torch.device("cuda", torch.cuda.current_device())
    enable_usp(model, functools.partial(kernel, None), ulysses_degree, ring_degree, device)
