#!/usr/bin/env python
"""Self-attention kernels at the real token counts of one transformer forward (40 heads x 128, bf16): time per
call and output difference from cuDNN (the default, exact path).

    PYTHONPATH=src python bench/bench_attention.py --shapes reference_720P avatar_480P --json attention.json

Kernels: PyTorch SDPA forced to cuDNN / flash / memory-efficient (diffusers' `_native_*` backends) and, when the
package is installed, SageAttention's `sageattn` (8-bit QK). `--tiny --device cpu` checks the script.

The 8-bit kernel table: `--tokens` switches to it. For each token count and head count it times cuDNN
SDPA and our Triton 8-bit kernel (each `--modes` entry: Q·K INT8/FP8, P·V FP8/bf16; the whole call with its
quantisation pre-pass, and the pre-pass alone) and measures each kernel's relative error against float32
attention (memory-efficient SDPA in float32 on the first `--error-queries` queries of two heads) on Gaussian
inputs and on `outlier` inputs (a per-channel K mean of std 2, four channels of Q and K with a mean of 3 and std 5,
V with a per-channel mean of std 1):

    PYTHONPATH=src python bench/bench_attention.py --tokens 32760 75600 126000 144000 --heads 40 20 10 --json k.json
    PYTHONPATH=src python bench/bench_attention.py --tokens 75600 --heads 40 --configs   # every CONFIGS entry
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transformer import SHAPES, add_run_arguments, device_name, sync, write_json  # noqa: E402


KERNELS = ("_native_cudnn", "_native_flash", "_native_efficient", "sage")


def attention(kernel: str, q, k, v):
    if kernel == "sage":
        from sageattention import sageattn

        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False)
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn(q, k, v, backend=kernel)


def make_qkv(tokens: int, heads: int, inputs: str, device, seed: int = 0):
    """bf16 (1, tokens, heads, 128) q, k, v: `gaussian` or `outlier` (see the module docstring)."""
    g = torch.Generator(device).manual_seed(seed)
    q, k, v = (torch.randn(1, tokens, heads, 128, device=device, generator=g) for _ in range(3))
    if inputs == "outlier":
        k += 2.0 * torch.randn(1, 1, heads, 128, device=device, generator=g)
        v += torch.randn(1, 1, heads, 128, device=device, generator=g)
        channels = torch.randperm(128, device=device, generator=g)[:4]
        for x in (q, k):
            x[..., channels] = 3.0 + 5.0 * x[..., channels]
    return tuple(x.to(torch.bfloat16) for x in (q, k, v))


def time_ms(fn, repeats: int, device: torch.device) -> float:
    """Median of `repeats` timed calls after one warm-up, in ms."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def relative_error(out, q, k, v, queries: int) -> float:
    """||out - ref|| / ||ref|| on the first `queries` queries of the first two heads, ref in float32."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    heads = slice(0, min(2, q.shape[2]))
    qs, ks, vs = (x[:, : queries if x is q else None, heads].transpose(1, 2).float() for x in (q, k, v))
    backend = SDPBackend.EFFICIENT_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel(backend):
        ref = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
    got = out[:, :queries, heads].float()
    return ((got - ref).norm() / ref.norm()).item()


MODES = ("int8_fp8", "int8_bf16", "fp8_fp8", "fp8_bf16", "int8_fp8_exp16", "int8_fp8_mulp")


def mode_options(mode: str) -> dict:
    """`"qk_pv"` (e.g. `int8_fp8`) -> attention_8bit_impl's options; an `_exp16` suffix turns on the f16x2 `ex2`,
    `_mulp` scales P into FP8's range with a multiply per score (the kernel before 2026-11-29's second run)."""
    qk, pv, *rest = mode.split("_")
    return dict(qk=qk, pv=pv, fast_exp=rest == ["exp16"], fold_p_scale=rest != ["mulp"])


def kernel_table(args) -> list[dict]:
    """cuDNN SDPA against the 8-bit kernel in each mode: ms, TFLOP/s, ratio, pre-pass ms, errors."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from skyreels_diffusers.kernels.attention_8bit import CONFIGS, attention_8bit_impl, quantize_qkv

    def cudnn(q, k, v):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.MATH):
            return torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(
                1, 2
            )

    rows, device = [], torch.device(args.device)
    for heads in args.heads:
        for tokens in args.tokens:
            flops = 4 * tokens**2 * heads * 128
            errors = {}
            for inputs in ("gaussian", "outlier"):
                q, k, v = make_qkv(tokens, heads, inputs, args.device)
                errors[("cudnn", inputs)] = relative_error(cudnn(q, k, v), q, k, v, args.error_queries)
                for mode in args.modes:
                    errors[(mode, inputs)] = relative_error(
                        attention_8bit_impl(q, k, v, **mode_options(mode)), q, k, v, args.error_queries
                    )
            q, k, v = make_qkv(tokens, heads, "gaussian", args.device)
            base_ms = time_ms(lambda: cudnn(q, k, v), args.repeats, device)  # noqa: B023
            entries = [("cudnn", None, base_ms, None)]
            for mode in args.modes:
                options = mode_options(mode)
                configs = CONFIGS if args.configs else [None]
                for config in configs:
                    ms = time_ms(
                        lambda c=config: attention_8bit_impl(q, k, v, config=c, **options),  # noqa: B023
                        args.repeats,
                        device,
                    )
                    pre_ms = time_ms(
                        lambda: quantize_qkv(q, k, v, options["qk"], options["pv"]),  # noqa: B023
                        args.repeats,
                        device,
                    )
                    entries.append((mode, config, ms, pre_ms))
            for kernel, config, ms, pre_ms in entries:
                mode = kernel if config is None or kernel == "cudnn" else f"{kernel}{list(config)}"
                rows.append(
                    dict(
                        tokens=tokens,
                        heads=heads,
                        kernel=mode,
                        ms=round(ms, 2),
                        tflops=round(flops / ms / 1e9, 1),
                        vs_cudnn=round(base_ms / ms, 3),
                        prepass_ms=None if pre_ms is None else round(pre_ms, 2),
                        rel_error_gaussian=round(errors[(kernel, "gaussian")], 5),
                        rel_error_outlier=round(errors[(kernel, "outlier")], 5),
                        device=device_name(device),
                        date=time.strftime("%Y-%m-%d"),
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
    from skyreels_diffusers.kernels.attention_8bit import TUNING

    for key, timings in TUNING.items():
        print("tile configs timed at the first call", dict(key), {str(c): t for c, t in timings.items()})
    print(
        "\n| heads | tokens | kernel | ms | TFLOP/s | vs cuDNN | pre-pass ms | rel. err. Gaussian "
        "| rel. err. outlier |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['heads']} | {r['tokens']} | {r['kernel']} | {r['ms']} | {r['tflops']} | {r['vs_cudnn']}x | "
            f"{r['prepass_ms'] if r['prepass_ms'] is not None else '-'} | {r['rel_error_gaussian']:.4f} | "
            f"{r['rel_error_outlier']:.4f} |"
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", nargs="+", default=["reference_720P"], help="variant_resolution keys of bench_transformer.SHAPES"
    )
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="8-bit kernel table at these lengths")
    parser.add_argument("--heads", type=int, nargs="+", default=[40], help="8-bit kernel table: head counts")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["int8_fp8", "int8_bf16"],
        choices=MODES,
        help="8-bit kernel table: Q·K_P·V[_exp16]",
    )
    parser.add_argument("--configs", action="store_true", help="8-bit kernel table: time every tile config")
    parser.add_argument("--error-queries", type=int, default=2048)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.tokens:
        write_json(args.json, kernel_table(args))
        return 0
    device = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        variant, resolution = shape.rsplit("_", 1)
        frames, height, width = SHAPES[(variant, resolution)]
        tokens = 64 if args.tiny else frames * height * width // 4
        g = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(1, tokens, 40, 128, device=device, dtype=torch.bfloat16, generator=g) for _ in range(3))
        reference = None
        for kernel in args.kernels:
            try:
                out = attention(kernel, q, k, v)
            except Exception as error:  # a kernel that does not install or run here is recorded, not fatal
                rows.append(
                    dict(shape=shape, tokens=tokens, kernel=kernel, error=f"{type(error).__name__}: {error}"[:300])
                )
                print(json.dumps(rows[-1]), flush=True)
                continue
            times = []
            for _ in range(args.repeats):
                sync(device)
                start = time.perf_counter()
                attention(kernel, q, k, v)
                sync(device)
                times.append((time.perf_counter() - start) * 1e3)
            ms = sorted(times)[len(times) // 2]
            if reference is None:
                reference, reference_ms = out.float(), ms
            rel = ((out.float() - reference).norm() / reference.norm()).item()
            tflops = 4 * tokens * tokens * 40 * 128 / (ms / 1e3) / 1e12
            rows.append(
                dict(
                    shape=shape,
                    tokens=tokens,
                    kernel=kernel,
                    ms=round(ms, 2),
                    tflops=round(tflops, 1),
                    vs_first=round(ms / reference_ms, 3),
                    rel_diff_vs_first=round(rel, 5),
                    device=device_name(device),
                    date=time.strftime("%Y-%m-%d"),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
