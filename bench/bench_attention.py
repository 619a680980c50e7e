#!/usr/bin/env python
"""Self-attention kernels at the real token counts of one transformer forward (40 heads x 128, bf16): time per
call and output difference from cuDNN (the default, exact path).

    PYTHONPATH=src python bench/bench_attention.py --shapes reference_720P avatar_480P --json attention.json

Kernels: PyTorch SDPA forced to cuDNN / flash / memory-efficient (diffusers' `_native_*` backends) and, when the
package is installed, SageAttention's `sageattn` (8-bit QK). `--tiny --device cpu` checks the script.
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["reference_720P"],
                        help="variant_resolution keys of bench_transformer.SHAPES")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS))
    parser.add_argument("--repeats", type=int, default=5)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for shape in args.shapes:
        variant, resolution = shape.rsplit("_", 1)
        frames, height, width = SHAPES[(variant, resolution)]
        tokens = 64 if args.tiny else frames * height * width // 4
        g = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(1, tokens, 40, 128, device=device, dtype=torch.bfloat16, generator=g)
                   for _ in range(3))
        reference = None
        for kernel in args.kernels:
            try:
                out = attention(kernel, q, k, v)
            except Exception as error:  # a kernel that does not install or run here is recorded, not fatal
                rows.append(dict(shape=shape, tokens=tokens, kernel=kernel, error=f"{type(error).__name__}: {error}"[:300]))
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
            rows.append(dict(shape=shape, tokens=tokens, kernel=kernel, ms=round(ms, 2), tflops=round(tflops, 1),
                             vs_first=round(ms / reference_ms, 3), rel_diff_vs_first=round(rel, 5),
                             device=device_name(device),
                             date=time.strftime("%Y-%m-%d")))
            print(json.dumps(rows[-1]), flush=True)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
