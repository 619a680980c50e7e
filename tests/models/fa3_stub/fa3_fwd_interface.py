"""A stand-in for FlashAttention-3's Python API (`flash_attn_func`, the calling convention of `flash_attn_interface`,
`fa3_fwd_interface` and the Hub's FA3) in plain PyTorch, for CPU tests: exact attention in float32 on the
dequantised inputs (FP8 inputs times their per-(batch, head) descales), returning the output and the natural-log
log-sum-exp `(B, H, L)` as FA3 does, bf16 for FP8 inputs. It does not round P to FP8 as FA3's FP8 kernel does.
Every call is recorded in `CALLS`."""

from __future__ import annotations

import torch


CALLS: list[dict] = []


def flash_attn_func(
    q,
    k,
    v,
    softmax_scale=None,
    causal=False,
    qv=None,
    q_descale=None,
    k_descale=None,
    v_descale=None,
    return_attn_probs=False,
    **unused,
):
    assert not causal and qv is None
    assert q.shape[-1] == k.shape[-1] and q.shape[2] == k.shape[2] and k.shape[:3] == v.shape[:3]

    def dequantised(x, descale):
        x = x.float()
        return x if descale is None else x * descale[:, None, :, None]

    q32, k32, v32 = dequantised(q, q_descale), dequantised(k, k_descale), dequantised(v, v_descale)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q32, k32) * scale
    lse = scores.logsumexp(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", (scores - lse[..., None]).exp(), v32)
    CALLS.append(dict(dtype=q.dtype, q=tuple(q.shape), k=tuple(k.shape), descaled=q_descale is not None))
    out = out.to(torch.bfloat16 if q.dtype == torch.float8_e4m3fn else q.dtype)
    return (out, lse) if return_attn_probs else out
