"""Hadamard rotation of attention queries and keys before 8-bit quantisation (plain PyTorch, no Triton).

A Walsh-Hadamard matrix `H` (entries ±1, `H Hᵀ = D I`) leaves every score unchanged up to the factor `D`:
`(q H)(k H)ᵀ = D q kᵀ`, so attention on rotated inputs with the softmax scale divided by `D` is the same attention.
What changes is how the values spread over the channels: a few large channels (the outliers that trained attention
has in K) are spread over all `D`, so an 8-bit copy with one scale per head, token or block loses far less of the
small channels. The ±1 entries are exact in bf16, so the rotation adds only the bf16 rounding of its output.
"""

from __future__ import annotations

import torch


def hadamard_matrix(dim: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The `dim x dim` Sylvester-Hadamard matrix (entries ±1); `dim` a power of two."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head dim, got {dim}")
    h = torch.ones(1, 1, device=device, dtype=dtype)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def rotate(query: torch.Tensor, key: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`(query H, key H, scale / D)` for `(..., D)` tensors: the same attention, outliers spread over the channels
    (`scale` None means `1 / sqrt(D)`). The product runs in the inputs' dtype (bf16: one rounding of the result)."""
    dim = query.shape[-1]
    scale = dim**-0.5 if scale is None else scale
    h = hadamard_matrix(dim, query.device, query.dtype)
    return query @ h, key @ h, scale / dim
