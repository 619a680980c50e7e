"""FlashAttention-3 as diffusers attention backends, and which attention backend a run uses.

    pipe.transformer.set_attention_backend("fa3")      # exact: FlashAttention-3 in bf16 (the fastest exact kernel on Hopper)
    pipe.transformer.set_attention_backend("fa3_fp8")  # lossy: FA3 in FP8, K smoothed, Q/K rotated, per-head scales

FA3 comes from the first of these that imports: FA3's own build (`flash_attn_interface`, built from flash-attention's
`hopper/` folder), the forward-only `fa3-fwd` wheel (`fa3_fwd_interface`: `pip install 'skyreels-diffusers[fa3]'`),
or, asked for by name with the `kernels` package installed, the prebuilt FA3 that diffusers' `_flash_3_hub` backend
downloads from the Hugging Face Hub. `default_attention_backend` picks `fa3` on Hopper (sm_90) when one of the two
packages imports (the original code uses FA3 the same way when it is installed); it never picks the Hub download.

Both backends run FA3 on the calls it takes (no mask, no dropout, not causal, bf16/fp16, head dim <= 256) and hand
every other call (an attention mask, float32) to diffusers' `native` backend unchanged, as the 8-bit backends do.
The SkyReels-V3 processors send cross-attentions of a lossy backend (`fa3_fp8`, `triton_8bit*`) to an exact one
(`cross_attention_backend`): their cost is small and they carry the text and image conditioning.

Context parallelism: both are registered as supporting it. FA3 returns each query's log-sum-exp, so Ulysses, ring
attention (which merges partial results by it) and their combination all work. `fa3_fp8` subtracts K's mean over the
tokens it sees, which shifts every score of a query by `q · mean(K)` (softmax ignores it) and its log-sum-exp by the
same amount; the log-sum-exp it returns adds the shift back, so ring chunks, each with its own mean, merge exactly.
Inference only: there is no backward.

diffusers names its backends in an `Enum`; `attention_8bit_backend._add_backend_name` adds ours to it and diffusers'
own `_AttentionBackendRegistry.register` does the rest. Nothing of diffusers is replaced.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
from diffusers.models.attention_dispatch import (
    AttentionBackendName,
    _AttentionBackendRegistry,
)

from ..kernels.rotation import rotate
from .attention_8bit_backend import BACKENDS as TRITON_8BIT_BACKENDS
from .attention_8bit_backend import _add_backend_name, check_8bit_backend_available, register_inference_backend


FA3 = "fa3"
FA3_FP8 = "fa3_fp8"
# FlashAttention-3 packages, in the order they are tried (the Hub download comes last and only when asked for)
FA3_PACKAGES = ("flash_attn_interface", "fa3_fwd_interface")
FA3_INSTALL = (
    "pip install 'skyreels-diffusers[fa3]' (the forward-only fa3-fwd wheel, built for torch 2.10), or build "
    "FlashAttention-3 from flash-attention's hopper/ folder (flash_attn_interface), or pip install kernels to let "
    "diffusers fetch its prebuilt FA3 from the Hugging Face Hub"
)
FP8_MAX = 448.0  # largest float8_e4m3fn
# `fa3_fp8`'s input preparation (see `quantize_fp8_inputs`): per-head scales, K smoothed, Q/K rotated, V centred
FA3_FP8_OPTIONS = dict(scaled=True, smooth_k=True, rotate_qk=True, smooth_v=True)
LOSSY_BACKENDS = (FA3_FP8, *TRITON_8BIT_BACKENDS)


def _name(backend) -> str | None:
    return None if backend is None else str(getattr(backend, "value", backend))


# ----------------------------------------------------------------------------------------------- finding FA3


@functools.cache
def _local_fa3() -> tuple[str | None, object]:
    """(name, module) of the first FA3 package that imports here, or (None, why each failed)."""
    errors = []
    for name in FA3_PACKAGES:
        try:
            return name, importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:  # the package is there but something it needs is not
                errors.append(f"{name}: {error}")
        except Exception as error:  # a build for another torch / CUDA fails at import: say so
            errors.append(f"{name}: {type(error).__name__}: {error}")
    return None, "; ".join(errors)


def fa3_provider(hub: bool = True) -> str | None:
    """Which FlashAttention-3 runs here: `"flash_attn_interface"`, `"fa3_fwd_interface"`, `"hub"` (the `kernels`
    package is installed; diffusers downloads the kernel at first use; only with `hub=True`) or None."""
    name, _ = _local_fa3()
    if name is not None:
        return name
    if hub and importlib.util.find_spec("kernels") is not None:
        return "hub"
    return None


@functools.cache
def _fa3_function():
    """The provider's `flash_attn_func` (one calling convention for all three)."""
    name, module = _local_fa3()
    if name is not None:
        return module.flash_attn_func
    if fa3_provider() == "hub":
        from diffusers.models.attention_dispatch import _HUB_KERNELS_REGISTRY, _maybe_download_kernel_for_backend

        _maybe_download_kernel_for_backend(AttentionBackendName._FLASH_3_HUB)
        return _HUB_KERNELS_REGISTRY[AttentionBackendName._FLASH_3_HUB].kernel_fn
    raise ImportError(f"FlashAttention-3 is not installed: {FA3_INSTALL}")


def reset_fa3_discovery() -> None:
    """Forget which FA3 was found (after installing one in a running process; tests)."""
    _local_fa3.cache_clear()
    _fa3_function.cache_clear()


# ----------------------------------------------------------------------------------------------- the FA3 calls


def _fa3_call(query, key, value, scale, q_descale=None, k_descale=None, v_descale=None):
    out, lse = _fa3_function()(
        query,
        key,
        value,
        softmax_scale=scale,
        causal=False,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
        return_attn_probs=True,
    )[:2]
    return out.contiguous(), lse.contiguous()  # the fakes' layout (FA3's own; a no-op there)


@torch.library.custom_op("skyreels::fa3_attention", mutates_args=())
def fa3_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-3 on `(B, L, H, D)` tensors: the output and each query's log-sum-exp `(B, H, L)` (float32,
    natural log). One op to `torch.compile` whichever package provides FA3."""
    return _fa3_call(query, key, value, scale)


@fa3_attention.register_fake
def _(query, key, value, scale=None):
    batch, tokens, heads, _ = query.shape
    out = query.new_empty((batch, tokens, heads, value.shape[-1]))
    return out, query.new_empty((batch, heads, tokens), dtype=torch.float32)


def quantize_fp8_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None = None,
    scaled: bool = True,
    smooth_k: bool = True,
    rotate_qk: bool = True,
    smooth_v: bool = True,
    with_lse: bool = False,
) -> dict:
    """FlashAttention-3's FP8 inputs (float8_e4m3fn, `(B, L, H, D)`) and what undoes the preparation.

    * `smooth_k`: K's mean over the tokens (per head and channel) is subtracted: every score of a query moves by
      the same `q · mean`, which softmax ignores, and the channel bias that dominates K's 8-bit rounding is gone.
    * `rotate_qk`: Q and K are multiplied by a ±1 Hadamard matrix (`kernels.rotation`; the softmax scale takes the
      factor back), spreading K's outlier channels over all channels before rounding.
    * `smooth_v`: V's per-channel mean is subtracted and added back to the output (the weights of a row sum to 1),
      less V's mean FP8 rounding error over the tokens (what dominates the error of rows spread over many keys).
    * `scaled`: one scale per (batch, head) maps each of Q, K, V's largest magnitude to e4m3's 448 (FA3 takes
      descales of that shape only: no per-token or per-block scales), so no value overflows and few underflow.
      Without it (and without the rest) this is the plain cast FA3's FP8 mode takes by default.
    FA3 itself scales P by 2^8 before rounding it to FP8 (its `Max_offset`), so small probabilities keep their bits.
    Returns `q, k, v, q_descale, k_descale, v_descale, softmax_scale, v_mean` and, with `with_lse`, `lse_shift`
    `(B, H, L)`: what to add to FA3's log-sum-exp to get that of the unsmoothed scores.
    """
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    original_query = query
    k_mean = None
    if smooth_k:
        k_mean = key.mean(dim=1, keepdim=True, dtype=torch.float32).to(key.dtype)  # (B, 1, H, D)
        key = key - k_mean
    softmax_scale = scale
    if rotate_qk:
        query, key, softmax_scale = rotate(query, key, scale)
    original_value = value
    if smooth_v:
        value = value - value.mean(dim=1, keepdim=True, dtype=torch.float32).to(value.dtype)
    out = dict(softmax_scale=softmax_scale, v_mean=None)
    for name, x in (("q", query), ("k", key), ("v", value)):
        descale = None
        if scaled:  # the scale is applied in the input dtype (no float32 copy) and the descale is its exact inverse
            largest = torch.maximum(x.amax(dim=(1, 3)), -x.amin(dim=(1, 3))).float().clamp_min(1e-30)  # (B, H)
            inverse = (FP8_MAX / largest).clamp_max(torch.finfo(x.dtype).max).to(x.dtype)  # fp16: no inf
            descale = 1.0 / inverse.float()
            x = x * inverse[:, None, :, None]
        out[name] = x.to(torch.float8_e4m3fn)
        out[f"{name}_descale"] = descale
    if smooth_v:  # what the output gets back: V's mean, less the mean FP8 rounding error of V over the tokens
        dequantised_mean = out["v"].to(value.dtype).mean(dim=1, keepdim=True, dtype=torch.float32)
        if descale is not None:
            dequantised_mean = dequantised_mean * descale[:, None, :, None]
        v_mean = original_value.mean(dim=1, keepdim=True, dtype=torch.float32) - dequantised_mean
        out["v_mean"] = v_mean.to(original_value.dtype)
    if with_lse:
        if k_mean is None:
            out["lse_shift"] = original_query.new_zeros((), dtype=torch.float32)
        else:  # scale * (q · mean(K)) per (batch, head, query)
            shift = torch.einsum("blhd,bhd->bhl", original_query.float(), k_mean[:, 0].float())
            out["lse_shift"] = shift * scale
    return out


@torch.library.custom_op("skyreels::fa3_fp8_kernel", mutates_args=())
def fa3_fp8_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-3's FP8 kernel alone on float8_e4m3fn `(B, L, H, D)` tensors and their `(B, H)` descales: the
    output in bf16 (FA3's choice for FP8) and each query's log-sum-exp `(B, H, L)`. The only opaque op of
    `fa3_fp8_attention`: its preparation is plain PyTorch, which `torch.compile` fuses (with the ops before it)."""
    return _fa3_call(query, key, value, scale, q_descale, k_descale, v_descale)


@fa3_fp8_kernel.register_fake
def _(query, key, value, scale, q_descale=None, k_descale=None, v_descale=None):
    batch, tokens, heads, _ = query.shape
    out = query.new_empty((batch, tokens, heads, value.shape[-1]), dtype=torch.bfloat16)
    return out, query.new_empty((batch, heads, tokens), dtype=torch.float32)


def fa3_fp8_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None = None,
    scaled: bool = True,
    smooth_k: bool = True,
    rotate_qk: bool = True,
    smooth_v: bool = True,
    with_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-3 in FP8 on bf16/fp16 `(B, L, H, D)` tensors, inputs prepared by `quantize_fp8_inputs`:
    the output in the input dtype and, with `with_lse`, each query's log-sum-exp of the unsmoothed scores `(B, H, L)`
    (an empty tensor without it). Under `torch.compile` the preparation (about twenty passes over Q, K and V in eager
    mode) is traced and fused; only the kernel (`fa3_fp8_kernel`) is opaque."""
    pre = quantize_fp8_inputs(query, key, value, scale, scaled, smooth_k, rotate_qk, smooth_v, with_lse)
    out, lse = fa3_fp8_kernel(
        pre["q"], pre["k"], pre["v"], pre["softmax_scale"], pre["q_descale"], pre["k_descale"], pre["v_descale"]
    )
    out = out.to(query.dtype)
    if pre["v_mean"] is not None:
        out = out + pre["v_mean"]
    lse = lse + pre["lse_shift"] if with_lse else lse.new_empty(0)
    return out, lse


# ----------------------------------------------------------------------------------------------- the backends


def _takes(query, key, value, attn_mask, dropout_p: float, is_causal: bool, enable_gqa: bool) -> bool:
    """Whether FA3 runs this call (else diffusers' `native` backend does)."""
    return (
        attn_mask is None
        and dropout_p == 0.0
        and not is_causal
        and not enable_gqa
        and query.dtype in (torch.bfloat16, torch.float16)
        and query.dtype == key.dtype == value.dtype
        and query.shape[-1] == key.shape[-1] == value.shape[-1]
        and query.shape[-1] <= 256
        and query.shape[-1] % 8 == 0
        and query.shape[2] == key.shape[2]
    )


def _run_fa3(query, key, value, scale, return_lse: bool):
    out, lse = fa3_attention(query, key, value, scale)
    return (out, lse.permute(0, 2, 1)) if return_lse else out  # diffusers' layout: (B, L, H)


def _run_fa3_fp8(query, key, value, scale, return_lse: bool):
    out, lse = fa3_fp8_attention(query, key, value, scale, **FA3_FP8_OPTIONS, with_lse=return_lse)
    return (out, lse.permute(0, 2, 1)) if return_lse else out


for _backend, _run in ((FA3, _run_fa3), (FA3_FP8, _run_fa3_fp8)):
    if _add_backend_name(_backend) not in _AttentionBackendRegistry._backends:
        register_inference_backend(_backend, _run, _takes, returns_lse=True, takes_what="unmasked bf16/fp16 attention")
# members, so that code `torch.compile` traces (the processors' `cross_attention_backend`) never calls the Enum
_FA3_MEMBER = AttentionBackendName(FA3)
_NATIVE_MEMBER = AttentionBackendName.NATIVE


# ----------------------------------------------------------------------------------------------- choosing


def cross_attention_backend(backend):
    """The backend a cross-attention uses when the model's backend is `backend`: exact `fa3` for `fa3_fp8`,
    diffusers' `native` SDPA for the Triton 8-bit backends, `backend` itself otherwise (None stays None)."""
    name = _name(backend)
    if name == FA3_FP8:
        return _FA3_MEMBER
    if name in TRITON_8BIT_BACKENDS:
        return _NATIVE_MEMBER
    return backend


def check_attention_backend_available(backend, download: bool = True) -> None:
    """Raise a clear error, before any model loads, where `backend` cannot run here: FA3 missing (naming how to
    install it), no CUDA GPU, a GPU without FP8 for `fa3_fp8` (Hopper); an unknown name (`ValueError` listing the
    known ones) and a diffusers backend whose package is missing (diffusers' own check, `RuntimeError` naming the
    package). With the Hub's FA3 the kernel is downloaded here (not with `download=False`)."""
    from diffusers.models.attention_dispatch import _check_attention_backend_requirements

    name = _name(backend)
    if name is None:  # diffusers' default
        return
    try:
        member = AttentionBackendName(name)
    except ValueError:
        known = ", ".join(sorted(b.value for b in AttentionBackendName if not b.value.startswith("_")))
        raise ValueError(f"unknown attention backend {name!r}; the known ones: {known}, _native_cudnn, ...") from None
    if name in TRITON_8BIT_BACKENDS:
        check_8bit_backend_available(name)
        return
    if name not in (FA3, FA3_FP8):
        _check_attention_backend_requirements(member)  # flash-attn, sageattention, kernels, ... installed
        return
    provider = fa3_provider(hub=download)
    if provider is None:
        found = _local_fa3()[1]
        raise ImportError(
            f"attention backend {name!r} needs FlashAttention-3: {FA3_INSTALL}" + (f" ({found})" if found else "")
        )
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"attention backend {name!r} needs a CUDA GPU (FlashAttention-3 is built for Hopper, sm_90)"
        )
    capability = torch.cuda.get_device_capability()
    if name == FA3_FP8 and capability[0] != 9:
        raise RuntimeError(
            f"attention backend {name!r} needs FA3's FP8 kernels (Hopper, sm_90); this GPU is sm_{capability[0]}{capability[1]}"
        )
    if capability < (8, 0):
        raise RuntimeError(f"attention backend {name!r} needs compute capability 8.0+, this GPU has {capability}")
    if provider == "hub":
        _fa3_function()


def attention_backend_available(backend) -> bool:
    """Whether `backend` can run here (without downloading anything)."""
    try:
        check_attention_backend_available(backend, download=False)
    except (ImportError, RuntimeError, ValueError):
        return False
    return True


def default_attention_backend(device: torch.device | str | None = None) -> str | None:
    """The exact backend a run on `device` uses when none is asked for: `fa3` on a Hopper GPU (sm_90) where an FA3
    package imports, else None (diffusers' `native`: PyTorch SDPA's own choice, cuDNN on Hopper)."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    if torch.cuda.get_device_capability(device) != (9, 0):
        return None
    return FA3 if fa3_provider(hub=False) is not None else None
