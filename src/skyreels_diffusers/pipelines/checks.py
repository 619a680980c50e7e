"""Numerical checks the pipelines run between steps: never decode or write a NaN/inf (black or garbage) video."""

from __future__ import annotations

import torch


def check_finite(latents: torch.Tensor, step: str) -> torch.Tensor:
    """Raise `FloatingPointError` naming `step` when `latents` hold NaN or infinite values; returns `latents`.

    `step` says where the check ran (e.g. "denoising step 3/8" or "before VAE decode"), so the message points at
    the step that produced them; the usual causes (a non-finite guidance scale, fp16 overflow, broken weights) are
    listed in the message."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"check_finite expects a tensor, got {type(latents).__name__}.")
    finite = torch.isfinite(latents)
    if bool(finite.all()):
        return latents
    bad = int((~finite).sum())
    nan = int(torch.isnan(latents).sum())
    raise FloatingPointError(
        f"{step}: the latents hold {nan} NaN and {bad - nan} infinite values of {latents.numel()}; nothing was "
        "decoded or written (check for a non-finite guidance scale, float16 overflow or damaged weights)."
    )
