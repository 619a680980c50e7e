"""Encoders once: rank 0 runs the text / image / audio encoders and every rank receives the embeddings.

`compute_on_main(fn, device)` calls `fn()` (a dict of tensors, or None values) on rank 0 only and broadcasts the
result; the other ranks never need the encoders (the request layer does not load them there). Names, shapes and
dtypes travel as one small object, then each tensor by `dist.broadcast` on `device` (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from .context_parallel import broadcast_from_main, is_main_process


# components that only rank 0 loads and runs under torchrun (CLIP stays everywhere: the avatar's windows encode
# their motion frames with it, step by step on every rank)
MAIN_ONLY_ENCODERS = ("text_encoder", "audio_encoder")


def broadcast_tensors(tensors: dict[str, torch.Tensor | None] | None, device: torch.device) -> dict:
    """Rank 0's `tensors` on every rank, on `device` (None values stay None); `tensors` itself outside torchrun."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensors
    layout = None
    if is_main_process():
        layout = {k: None if v is None else (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    layout = broadcast_from_main(layout)
    received = {}
    for name, spec in layout.items():
        if spec is None:
            received[name] = None
            continue
        shape, dtype = spec
        if is_main_process():
            buffer = tensors[name].to(device).contiguous()
        else:
            buffer = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(buffer, src=0)
        received[name] = buffer
    return received


def compute_on_main(fn: Callable[[], dict], device: torch.device) -> dict:
    """`fn()` on rank 0, its tensors broadcast to every rank (outside torchrun: just `fn()`)."""
    return broadcast_tensors(fn() if is_main_process() else None, device)
