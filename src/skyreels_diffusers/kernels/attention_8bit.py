"""8-bit self-attention in Triton (SageAttention-style) for the long, non-causal self-attentions of the transformer.

    out = softmax(Q Kᵀ / sqrt(D)) V      Q, K, V: (batch, tokens, heads, head_dim), bf16/fp16, same token count

* K smoothing: the per-head mean of K over the tokens is subtracted first. Each query row's scores then all move by
  the same constant `q · mean`, which softmax ignores, and the channel bias that makes 8-bit Q·K inaccurate is gone.
* Q·Kᵀ in 8 bits, Q with one scale per token and K with one per block of 128 tokens: INT8 (default; exact integer
  products, converted to float32 with the 2^23 magic-number trick instead of an int-to-float instruction) or
  FP8-e4m3. `sm_scale` and log2(e) are folded into the Q scales, so the online softmax runs on `exp2` in float32.
* P·V in FP8-e4m3 with float32 accumulation (P, in [0, 1], is scaled by 2^8.8 into the e4m3 range inside the
  exponent; V has one scale per channel) or, in the accurate mode, in bf16.
* One pre-pass kernel reads Q, K and V once and writes the 8-bit copies and their scales (head-major, padded to a
  multiple of 128 tokens; V transposed to `(head_dim, tokens)`, the layout Hopper's FP8 MMA wants for P·V). The
  two reductions it needs first (K's mean, V's per-channel max) are PyTorch reductions.

* `rotate=True` (off by default) first multiplies Q and K by a ±1 Hadamard matrix (`rotation.py`): the scores are
  unchanged, K's outlier channels are spread over all channels, so the per-token / per-block 8-bit scales waste less.

`attention_8bit` is the entry point (a `torch.library` custom op, opaque to `torch.compile`). With
`TRITON_INTERPRET=1` the same kernels run on CPU tensors in Triton's interpreter (tests; slow).
`reference_attention_8bit` is the same quantisation math in plain PyTorch.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .rotation import rotate as rotate_qk


LOG2E = 1.4426950408889634
FP8_MAX = 448.0
INT8_MAX = 127.0
PAD = 128  # token padding of the quantised copies (>= every BLOCK_M / BLOCK_N)
QK_MODES = ("int8", "fp8")
PV_MODES = ("fp8", "bf16")
# (BLOCK_M, BLOCK_N, num_warps, num_stages[, warp-specialised loop]) timed at the first call on the GPU
# (`_best_config`; measured on an H200: (64, 128, 4, 3) led with FP8 P·V, (128, 64, 4, 3) with bf16 P·V). A config
# the compiler rejects is skipped. Warp specialisation (a fifth entry True) failed to build for sm_90 with Triton
# 3.6, so no default config asks for it; bench/attention_8bit_suite.sh probes it.
CONFIGS = [(64, 128, 4, 3), (64, 128, 4, 2), (128, 128, 8, 3), (128, 64, 4, 3)]
TUNING: dict[tuple, dict] = {}  # (flags) -> {config: ms or the error}, what `_best_config` measured
INTERPRETER_CONFIG = (64, 64, 4, 1)
P_LOG2_SCALE: tl.constexpr = tl.constexpr(8.8)  # FP8 P·V: P scaled by 2^8.8 (445.7, under e4m3's 448) in the exponent


def interpreter_mode() -> bool:
    """True when Triton runs its kernels in the CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _to_fp8(x, INTERPRET: tl.constexpr):
    """float32 -> FP8-e4m3 with round-to-nearest. Triton's CPU interpreter rounds this conversion wrongly, so there
    the value is first rounded to the e4m3 grid in float32 (3 mantissa bits, subnormal below 2^-6) and the
    conversion is exact."""
    if INTERPRET:
        x = x.to(tl.float32)
        exponent = tl.maximum(tl.floor(tl.math.log2(tl.maximum(tl.abs(x), 1e-30))), -6.0)
        ulp = tl.math.exp2(exponent - 3.0)
        x = tl.floor(x / ulp + 0.5) * ulp
    return x.to(tl.float8e4nv)


@triton.jit
def _quantize_rows(x, QMAX: tl.constexpr, FP8: tl.constexpr, INTERPRET: tl.constexpr):
    """Quantise each row of a float32 tile with its own scale; returns (8-bit tile, per-row scale)."""
    scale = tl.maximum(tl.max(tl.abs(x), 1), 1e-30) / QMAX
    xq = x / scale[:, None]
    if FP8:
        xq = _to_fp8(xq, INTERPRET)
    else:
        xq = (xq + tl.where(xq >= 0, 0.5, -0.5)).to(tl.int8)
    return xq, scale


@triton.jit
def _quantize_kernel(
    Q,
    K,
    V,
    QQ,
    QS,
    KQ,
    KS,
    VT,
    K_MEAN,
    V_MEAN,
    V_SCALE,
    L,
    L_PAD,
    H,
    stride_b,
    stride_l,
    stride_h,
    q_scale,
    BLOCK: tl.constexpr,
    D: tl.constexpr,
    QK_FP8: tl.constexpr,
    PV_FP8: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One program: BLOCK tokens of one (batch, head). Reads Q/K/V rows in the `(B, L, H, D)` layout once."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_l = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, D)
    src = b * stride_b + h * stride_h + offs_l[:, None] * stride_l + offs_d[None, :]
    valid = offs_l[:, None] < L
    dst = bh * L_PAD * D + offs_l[:, None] * D + offs_d[None, :]
    QMAX: tl.constexpr = 448.0 if QK_FP8 else 127.0

    q = tl.load(Q + src, mask=valid, other=0.0).to(tl.float32) * q_scale
    qq, qs = _quantize_rows(q, QMAX, QK_FP8, INTERPRET)
    tl.store(QQ + dst, qq)
    tl.store(QS + bh * L_PAD + offs_l, qs)

    k = tl.load(K + src, mask=valid, other=0.0).to(tl.float32) - tl.load(K_MEAN + bh * D + offs_d)[None, :]
    k = tl.where(valid, k, 0.0)
    k_scale = tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), 1e-30) / QMAX  # one scale for the block's tokens
    k = k / k_scale
    if QK_FP8:
        kq = _to_fp8(k, INTERPRET)
    else:
        kq = (k + tl.where(k >= 0, 0.5, -0.5)).to(tl.int8)
    tl.store(KQ + dst, kq)
    tl.store(KS + bh * (L_PAD // BLOCK) + pid, k_scale)

    if PV_FP8:
        v = tl.load(V + src, mask=valid, other=0.0).to(tl.float32) - tl.load(V_MEAN + bh * D + offs_d)[None, :]
        v = tl.where(valid, v, 0.0) / tl.load(V_SCALE + bh * D + offs_d)[None, :]
        tl.store(VT + bh * D * L_PAD + offs_d[None, :] * L_PAD + offs_l[:, None], _to_fp8(v, INTERPRET))


@triton.jit
def _exp2_f16(x):
    """2^x of float32 `x`, two at a time on the half-precision unit (`ex2.approx.f16x2`): twice the rate of the
    float32 `ex2`, and precise enough for a P that is rounded to FP8 next. Returns float16."""
    return tl.inline_asm_elementwise(
        asm="{ .reg .b32 t; cvt.rn.f16x2.f32 t, $2, $1; ex2.approx.f16x2 $0, t; }",
        constraints="=r,r,r",
        args=[x],
        dtype=tl.float16,
        is_pure=True,
        pack=2,
    )


@triton.jit
def _attention_block(
    acc,
    m_i,
    l_i,
    q,
    qs,
    KQ,
    KS,
    V,
    start,
    offs_n,
    offs_d,
    L,
    L_PAD,
    v_base,
    stride_vl,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QK_FP8: tl.constexpr,
    PV_FP8: tl.constexpr,
    MASK: tl.constexpr,
    FAST_EXP: tl.constexpr,
    FOLD_P: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One key/value block of the online softmax: scores, running max and sum, P·V into `acc`.

    K has one scale per 128 tokens, so a score is `raw * sc` with `sc` per query row, and the exponent
    `raw * sc - (bias * sc + m)` is one fused multiply-add per score."""
    cols = start + offs_n
    k = tl.load(KQ + cols[:, None] * D + offs_d[None, :])
    sc = qs * tl.load(KS + start // 128)
    if QK_FP8:
        raw = tl.dot(q, tl.trans(k))
        bias = 0.0
    else:
        # exact int32 -> float32 for |s| < 2^22 (|s| <= 127 * 127 * D): add 1.5 * 2^23 to the bits and reinterpret;
        # the float is then s + 1.5 * 2^23, the offset is taken off in the exponent below
        raw = (tl.dot(q, tl.trans(k)) + 0x4B400000).to(tl.float32, bitcast=True)
        bias = 12582912.0
    if MASK:
        raw = tl.where(cols[None, :] < L, raw, float("-inf"))
    m_new = tl.maximum(m_i, (tl.max(raw, 1) - bias) * sc)
    # FOLD_P: FP8 P·V wants P scaled into e4m3's range; adding P_LOG2_SCALE to the exponent does it for free (P
    # then peaks at 2^8.8 = 445.7 < 448, and the running sum carries the same factor, so it cancels in acc / l)
    shift = P_LOG2_SCALE if FOLD_P else 0.0
    exponent = raw * sc[:, None] - (bias * sc + m_new - shift)[:, None]
    if FAST_EXP:
        if INTERPRET:
            p = tl.math.exp2(exponent).to(tl.float16)
        else:
            p = _exp2_f16(exponent)
    else:
        p = tl.math.exp2(exponent)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
    if PV_FP8:
        v = tl.load(V + v_base + offs_d[:, None] * L_PAD + cols[None, :])  # (D, BLOCK_N) of Vᵀ
        # a fresh FP8 product per block, added in float32: Hopper's FP8 MMA accumulates with few bits, and
        # accumulating into the large running sum truncated it measurably
        p8 = _to_fp8(p if FOLD_P else p * 448.0, INTERPRET)
        acc = acc * alpha[:, None] + tl.dot(p8, tl.trans(v))
    else:
        v = tl.load(V + v_base + cols[:, None] * stride_vl + offs_d[None, :], mask=cols[:, None] < L, other=0.0)
        if INTERPRET:  # the interpreter's bf16 dot of a converted tile is wrong: same rounding, float32 product
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), acc * alpha[:, None])
        else:
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _attention_kernel(
    QQ,
    QS,
    KQ,
    KS,
    V,
    V_MEAN,
    V_SCALE,
    O,
    L: tl.constexpr,
    L_FULL: tl.constexpr,
    L_PAD,
    H,  # noqa: E741
    stride_vb,
    stride_vl,
    stride_vh,
    stride_ob,
    stride_ol,
    stride_oh,
    D: tl.constexpr,
    QK_FP8: tl.constexpr,
    PV_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FAST_EXP: tl.constexpr,
    FOLD_P: tl.constexpr,
    INTERPRET: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head) against all keys; writes `(B, L, H, D)` output rows.

    The token count `L` and `L_FULL` (the tokens in whole BLOCK_N blocks, computed on the host) are compile-time
    constants: one compilation per sequence length (a run has one or two), the tail block's test folds away, and
    Triton's CPU interpreter gets the plain loop bound it needs (with NumPy 2 it cannot use a run-time or derived
    scalar as a `range` bound)."""
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(QQ + bh * L_PAD * D + offs_m[:, None] * D + offs_d[None, :])
    qs = tl.load(QS + bh * L_PAD + offs_m)
    KQ += bh * L_PAD * D
    KS += bh * (L_PAD // 128)
    v_base = bh * D * L_PAD if PV_FP8 else b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in tl.range(0, L_FULL, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        acc, m_i, l_i = _attention_block(
            acc,
            m_i,
            l_i,
            q,
            qs,
            KQ,
            KS,
            V,
            start,
            offs_n,
            offs_d,
            L,
            L_PAD,
            v_base,
            stride_vl,
            D,
            BLOCK_N,
            QK_FP8,
            PV_FP8,
            False,
            FAST_EXP,
            FOLD_P,
            INTERPRET,
        )
    if L_FULL < L:
        acc, m_i, l_i = _attention_block(
            acc,
            m_i,
            l_i,
            q,
            qs,
            KQ,
            KS,
            V,
            L_FULL,
            offs_n,
            offs_d,
            L,
            L_PAD,
            v_base,
            stride_vl,
            D,
            BLOCK_N,
            QK_FP8,
            PV_FP8,
            True,
            FAST_EXP,
            FOLD_P,
            INTERPRET,
        )
    out = acc / l_i[:, None]
    if PV_FP8:
        v_scale = tl.load(V_SCALE + bh * D + offs_d)
        out = out * (v_scale if FOLD_P else v_scale / 448.0)[None, :] + tl.load(V_MEAN + bh * D + offs_d)[None, :]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < L)


_BEST_CONFIG: dict[tuple, tuple] = {}


def _launch(args: tuple, flags: dict, tokens: int, batch_heads: int, config: tuple) -> None:
    block_m, block_n, warps, stages, *specialize = config
    _attention_kernel[(triton.cdiv(tokens, block_m), batch_heads)](
        *args[:9],
        tokens - tokens % block_n,
        *args[9:],
        **flags,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
        num_stages=stages,
        WARP_SPECIALIZE=bool(specialize and specialize[0]),
    )


def _best_config(args: tuple, flags: dict, tokens: int, batch_heads: int) -> tuple:
    """The fastest of CONFIGS for this head dim and mode, timed once per process at the first call's shape."""
    key = tuple(sorted(flags.items()))
    if key not in _BEST_CONFIG:
        timings, TUNING[key] = {}, {}
        for config in CONFIGS:
            try:
                timings[config] = TUNING[key][config] = triton.testing.do_bench(
                    lambda c=config: _launch(args, flags, tokens, batch_heads, c), warmup=5, rep=20
                )
            except Exception as error:  # a config the compiler cannot build here is skipped
                TUNING[key][config] = f"{type(error).__name__}: {str(error)[:200]}"
        _BEST_CONFIG[key] = min(timings, key=timings.get)
    return _BEST_CONFIG[key]


def quantize_qkv(
    query, key, value, qk: str = "int8", pv: str = "fp8", scale: float | None = None, compensate_v: bool = True
) -> dict:
    """The pre-pass: 8-bit Q (per-token scales) and K (smoothed; per-128-token scales), and FP8 Vᵀ (smoothed;
    per-channel scales) when `pv == "fp8"`. Inputs `(B, L, H, D)`; outputs head-major `(B * H, L_pad, D)`, scales
    `(B * H, L_pad)` / `(B * H, L_pad / 128)`, Vᵀ `(B * H, D, L_pad)`. The Q scales include `scale * log2(e)`.

    `v_offset` `(B, H, D)` is what the kernel adds to each output row: V's centre, less (with `compensate_v`) the
    mean FP8 rounding error of V over the tokens. A row that spreads its weight over many keys (Gaussian inputs) is
    a near-zero average whose error is that mean rounding error; taking it off leaves P's rounding. A peaked row moves
    by the same ~1e-4 of V's range, which does not matter there."""
    batch, tokens, heads, dim = query.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    l_pad = triton.cdiv(tokens, PAD) * PAD
    qk_dtype = torch.float8_e4m3fn if qk == "fp8" else torch.int8
    dev = query.device
    out = dict(
        q=torch.empty(batch * heads, l_pad, dim, device=dev, dtype=qk_dtype),
        k=torch.empty(batch * heads, l_pad, dim, device=dev, dtype=qk_dtype),
        q_scale=torch.empty(batch * heads, l_pad, device=dev, dtype=torch.float32),
        k_scale=torch.empty(batch * heads, l_pad // PAD, device=dev, dtype=torch.float32),
        k_mean=key.mean(dim=1, dtype=torch.float32).contiguous(),  # (B, H, D)
        tokens=tokens,
        l_pad=l_pad,
    )
    if pv == "fp8":
        v_min, v_max = torch.aminmax(value, dim=1)  # (B, H, D); V is smoothed by the centre of its range
        out["v_mean"] = (v_max.float() + v_min.float()) / 2
        out["v_scale"] = ((v_max.float() - v_min.float()).clamp_min(1e-30) / (2 * FP8_MAX)).contiguous()
        out["v"] = torch.empty(batch * heads, dim, l_pad, device=dev, dtype=torch.float8_e4m3fn)
    else:
        out["v_mean"], out["v_scale"], out["v"] = out["k_mean"], out["k_mean"], None  # unused in the bf16 mode
    if not (query.stride() == key.stride() == value.stride()) or query.stride(-1) != 1:
        query, key, value = query.contiguous(), key.contiguous(), value.contiguous()
    grid = (l_pad // PAD, batch * heads)
    _quantize_kernel[grid](
        query,
        key,
        value,
        out["q"],
        out["q_scale"],
        out["k"],
        out["k_scale"],
        out["v"] if pv == "fp8" else out["q"],
        out["k_mean"],
        out["v_mean"],
        out["v_scale"],
        tokens,
        l_pad,
        heads,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        scale * LOG2E,
        BLOCK=PAD,
        D=dim,
        QK_FP8=qk == "fp8",
        PV_FP8=pv == "fp8",
        INTERPRET=interpreter_mode(),
        num_warps=8,
    )
    out["v_offset"] = out["v_mean"]
    if pv == "fp8" and compensate_v:
        fp8_mean = out["v"][:, :, :tokens].to(value.dtype).mean(-1, dtype=torch.float32)  # (B * H, D)
        dequantised_mean = fp8_mean.view(batch, heads, dim) * out["v_scale"]
        out["v_offset"] = value.mean(dim=1, dtype=torch.float32) - dequantised_mean
    return out


def _check(query, key, value, qk: str, pv: str) -> None:
    if qk not in QK_MODES or pv not in PV_MODES:
        raise ValueError(f"qk must be one of {QK_MODES} and pv one of {PV_MODES}, got {qk!r}, {pv!r}")
    if query.shape != key.shape or key.shape != value.shape:
        raise ValueError(
            f"8-bit attention is self-attention: q, k, v shapes must match, got {query.shape}, "
            f"{key.shape}, {value.shape}"
        )
    if query.dim() != 4 or query.shape[-1] not in (64, 128):
        raise ValueError(f"expected (batch, tokens, heads, head_dim) with head_dim 64 or 128, got {query.shape}")
    if query.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"8-bit attention takes bf16/fp16 inputs, got {query.dtype}")
    if query.device.type != "cuda" and not interpreter_mode():
        raise RuntimeError(
            "8-bit attention runs on a CUDA GPU (FP8 needs compute capability 8.9+, Hopper for "
            "speed); on a CPU only in Triton's interpreter (TRITON_INTERPRET=1)"
        )


def attention_8bit_impl(
    query,
    key,
    value,
    scale: float | None = None,
    qk: str = "int8",
    pv: str = "fp8",
    config: tuple | None = None,
    fast_exp: bool = False,
    fold_p_scale: bool = True,
    rotate: bool = False,
    compensate_v: bool = True,
) -> torch.Tensor:
    """8-bit attention on `(B, L, H, D)` tensors, returning `(B, L, H, D)` in the input dtype. `config` fixes
    `(BLOCK_M, BLOCK_N, num_warps, num_stages[, warp_specialize])` instead of autotuning (benchmarks; the
    interpreter); `fast_exp` computes P with the half-precision `ex2` (measured no faster on an H200: off by
    default); `fold_p_scale=False` scales P into FP8's range with a multiply per score instead of inside the
    exponent (the earlier kernel, kept for the benchmark's comparison); `rotate` Hadamard-rotates Q and K first
    (see the module docstring); `compensate_v=False` leaves V's mean rounding error in (`quantize_qkv`)."""
    _check(query, key, value, qk, pv)
    if rotate:
        query, key, scale = rotate_qk(query, key, scale)
    batch, tokens, heads, dim = query.shape
    pre = quantize_qkv(query, key, value, qk, pv, scale, compensate_v)
    out = torch.empty_like(query)
    v = pre["v"] if pv == "fp8" else value
    args = (
        pre["q"],
        pre["q_scale"],
        pre["k"],
        pre["k_scale"],
        v,
        pre["v_offset"],
        pre["v_scale"],
        out,
        tokens,
        pre["l_pad"],
        heads,
        v.stride(0) if pv == "bf16" else 0,
        v.stride(1) if pv == "bf16" else 0,
        v.stride(2) if pv == "bf16" else 0,
        out.stride(0),
        out.stride(1),
        out.stride(2),
    )
    flags = dict(D=dim, QK_FP8=qk == "fp8", PV_FP8=pv == "fp8", FAST_EXP=fast_exp, INTERPRET=interpreter_mode())
    flags["FOLD_P"] = fold_p_scale and pv == "fp8"
    if config is None and interpreter_mode():
        config = INTERPRETER_CONFIG
    if config is None:
        config = _best_config(args, flags, tokens, batch * heads)
    _launch(args, flags, tokens, batch * heads, config)
    return out


@torch.library.custom_op("skyreels::attention_8bit", mutates_args=())
def attention_8bit(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None = None,
    qk: str = "int8",
    pv: str = "fp8",
    rotate: bool = False,
) -> torch.Tensor:
    """8-bit self-attention (see the module docstring), as an op `torch.compile` keeps whole."""
    return attention_8bit_impl(query, key, value, scale, qk, pv, rotate=rotate)


@attention_8bit.register_fake
def _(query, key, value, scale=None, qk="int8", pv="fp8", rotate=False):
    return torch.empty_like(query)


def _quantize_reference(x: torch.Tensor, qk: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) symmetric quantisation of float32 `x`: (8-bit values as float32, scales)."""
    qmax = FP8_MAX if qk == "fp8" else INT8_MAX
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / qmax
    y = x / scale
    y = y.to(torch.float8_e4m3fn).float() if qk == "fp8" else torch.trunc(y + torch.where(y >= 0, 0.5, -0.5))
    return y, scale


def reference_attention_8bit(
    query,
    key,
    value,
    scale: float | None = None,
    qk: str = "int8",
    pv: str = "fp8",
    rotate: bool = False,
    compensate_v: bool = True,
) -> torch.Tensor:
    """The kernel's quantisation math in PyTorch (float32), on `(B, L, H, D)`: smoothed K, 8-bit Q per token and K
    per block of 128 tokens,
    exact softmax, P (scaled by 2^8.8 against the row maximum) and V (per channel) in FP8 or P in bf16. The kernel
    quantises P against the running maximum of its key blocks instead, so the two agree closely, not exactly."""
    if rotate:
        query, key, scale = rotate_qk(query, key, scale)
    dim = query.shape[-1]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    q, k, v = (x.float().transpose(1, 2) for x in (query, key, value))  # (B, H, L, D)
    k = k - k.mean(dim=2, keepdim=True)
    qq, qs = _quantize_reference(q * (scale * LOG2E), qk)
    tokens = k.shape[2]
    blocks = torch.nn.functional.pad(k, (0, 0, 0, -tokens % PAD)).unflatten(2, (-1, PAD)).flatten(-2)  # K per block
    kq, ks = _quantize_reference(blocks, qk)
    kq = kq.unflatten(-1, (PAD, -1)).flatten(2, 3)[:, :, :tokens]
    ks = ks.expand(-1, -1, -1, PAD).flatten(2)[:, :, :tokens, None]
    s = (qq @ kq.transpose(-1, -2)) * qs * ks.transpose(-1, -2)
    p = torch.exp2(s - s.amax(-1, keepdim=True))
    denominator = p.sum(-1, keepdim=True)
    if pv == "fp8":
        v_max, v_min = v.amax(dim=2, keepdim=True), v.amin(dim=2, keepdim=True)
        v_mean, v_scale = (v_max + v_min) / 2, (v_max - v_min).clamp_min(1e-30) / (2 * FP8_MAX)
        p_scale = 2.0**P_LOG2_SCALE.value
        pq = (p * p_scale).to(torch.float8_e4m3fn).float()
        vq = ((v - v_mean) / v_scale).to(torch.float8_e4m3fn).float()
        offset = v_mean
        if compensate_v:  # V's mean rounding error taken off (`quantize_qkv`)
            offset = v.mean(dim=2, keepdim=True) - (vq * v_scale).mean(dim=2, keepdim=True)
        return ((pq @ vq) * v_scale / p_scale / denominator + offset).transpose(1, 2).to(query.dtype)
    else:
        out = p.to(query.dtype).float() @ v
    return (out / denominator).transpose(1, 2).to(query.dtype)
