#!/usr/bin/env python
"""The linear part of one transformer forward alone: every block linear layer at its real input shape, bf16 vs
FP8 (torchao, the same configs as `--quantize`), each compiled, summed over the 40 blocks.

    PYTHONPATH=src python bench/bench_linear.py --variants reference avatar --resolutions 480P 720P --json linear.json

This separates the FP8 target ("at least 1.5x faster than bf16 on the linear part") from attention and the
elementwise work. Input shapes per block: self-attention q/k/v/o and cross-attention q/o and the FFN on the video
tokens; cross-attention k/v on the 512 text tokens (and the 257 CLIP tokens, avatar); audio attention q/o on the
tokens and k/v on the audio context (avatar). `--tiny --device cpu` checks the script.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transformer import (
    RESOLUTION_CHOICES,
    SHAPES,
    VARIANT_CHOICES,
    add_run_arguments,
    build_model,
    check_shapes,
    device_name,
    sync,
    write_json,
)

from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS, TRANSFORMER_CONFIGS
from skyreels_diffusers.optimization import quantize_transformer


MODES = ("bf16", "fp8_weight_only", "fp8_dynamic", "bf16_fused", "fp8_dynamic_fused")
# `*_fused`: after `fuse_qkv_projections()`: one q/k/v matmul per self-attention (its input quantised once under
# FP8) and one k/v matmul per cross-attention, in place of the separate ones. Fused linear -> the ones it replaces
# (a self-attention has `to_qkv`, a cross-attention `to_kv` and, with CLIP context, `to_added_kv`).
FUSED_LINEARS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_kv": ("add_k_proj", "add_v_proj"),
}


def used_linears(block: torch.nn.Module, rows: dict) -> dict:
    """The row counts of the linears a forward calls: a fused attention calls its fused linears instead."""
    modules = dict(block.named_modules())
    used = {}
    for name, count in rows.items():
        parent, _, leaf = name.rpartition(".")
        attn = modules.get(parent)
        fused = None
        if getattr(attn, "fused_projections", False):
            fused = next(
                (
                    f
                    for f, parts in FUSED_LINEARS.items()
                    if leaf in parts and isinstance(getattr(attn, f, None), torch.nn.Linear)
                ),
                None,
            )
        used[f"{parent}.{fused}" if fused else name] = count
    return used


def block_linear_inputs(block: torch.nn.Module, tokens: int, image_tokens: int, audio_tokens: int) -> dict:
    """name -> number of rows each linear of one block sees in one forward."""
    rows = {}
    for name, module in block.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if name.startswith("attn2.") and name.split(".")[1] in ("to_k", "to_v"):
            rows[name] = 512
        elif name.startswith("attn2.") and name.split(".")[1] in ("add_k_proj", "add_v_proj"):
            rows[name] = image_tokens
        elif name.startswith("attn_audio.") and name.split(".")[1] in ("to_k", "to_v"):
            rows[name] = audio_tokens
        else:
            rows[name] = tokens
    return rows


def time_linears(block, rows: dict, device, repeats: int) -> tuple[float, dict]:
    """Milliseconds for one pass over every linear of `block` at its row count (each compiled on its own)."""
    modules = dict(block.named_modules())
    total, per = 0.0, {}
    for name, count in rows.items():
        linear = modules[name]
        x = torch.randn(count, linear.in_features, device=device, dtype=torch.bfloat16)
        fn = torch.compile(linear, fullgraph=True)
        with torch.no_grad():
            for _ in range(2):
                fn(x)
            sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                fn(x)
            sync(device)
        per[name] = (time.perf_counter() - start) * 1e3 / repeats
        total += per[name]
    return total, per


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["reference", "avatar"], choices=VARIANT_CHOICES)
    parser.add_argument("--resolutions", nargs="+", default=["480P", "720P"], choices=RESOLUTION_CHOICES)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=10)
    add_run_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.tiny:
        check_shapes(args.variants, args.resolutions)
    device = torch.device(args.device)
    torch._dynamo.config.recompile_limit = 1024  # one compiled graph per linear layer, shape and mode
    torch._dynamo.config.accumulated_recompile_limit = 4096
    rows_out = []
    for variant in args.variants:
        cfg = dict((TINY_TRANSFORMER_CONFIGS if args.tiny else TRANSFORMER_CONFIGS)[variant])
        cfg["num_layers"] = 1  # one block: all blocks have the same linears
        model = build_model(cfg, device)
        for resolution in args.resolutions:
            frames, height, width = (5, 8, 12) if args.tiny else SHAPES[(variant, resolution)]
            tokens = frames * height * width // 4
            audio_tokens = cfg.get("audio_context_tokens", 0) if cfg.get("audio_in_dim") else 0
            rows = block_linear_inputs(model.blocks[0], tokens, 257, audio_tokens)
            modules = dict(model.blocks[0].named_modules())
            flops = sum(2 * n * modules[name].in_features * modules[name].out_features for name, n in rows.items())
            baseline = None
            for mode in args.modes:
                quantized = copy.deepcopy(model)
                if mode.endswith("_fused"):
                    quantized.fuse_qkv_projections()
                if mode.startswith("fp8"):
                    quantize_transformer(quantized, mode.removesuffix("_fused"))
                used = used_linears(quantized.blocks[0], rows)
                ms, per = time_linears(quantized.blocks[0], used, device, args.repeats)
                layers = TRANSFORMER_CONFIGS[variant]["num_layers"]
                baseline = baseline or ms  # the first mode given (bf16 by default)
                row = dict(
                    variant=variant,
                    resolution=resolution,
                    tokens=tokens,
                    mode=mode,
                    ms_per_forward=round(ms * layers, 1),
                    speedup_vs_bf16=round(baseline / ms, 3),
                    tflops=round(flops / (ms / 1e3) / 1e12, 1),
                    per_linear_ms={k: round(v, 3) for k, v in per.items()},
                    device=device_name(device),
                    date=time.strftime("%Y-%m-%d"),
                )
                rows_out.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "per_linear_ms"}), flush=True)
                del quantized
        del model
    write_json(args.json, rows_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
