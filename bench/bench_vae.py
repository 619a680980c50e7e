#!/usr/bin/env python
"""Wan2.1 VAE decode of one 5-s video (31 latent frames) with and without tiling: time and peak GPU memory, to
choose the low-VRAM preset's VAE setting (random weights; decode cost does not depend on them).

    PYTHONPATH=src python bench/bench_vae.py --resolutions 540P 720P --tilings none default 512 --json vae.json

`default` = diffusers' tiles (256 px, stride 192); `512` = 512 px tiles with stride 448.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import SIZES  # noqa: E402
from bench_transformer import add_run_arguments, sync, write_json  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", nargs="+", default=["540P", "720P"])
    parser.add_argument("--tilings", nargs="+", default=["none", "default", "512"])
    parser.add_argument("--frames", type=int, default=31, help="latent frames (31 = 121 video frames)")
    add_run_arguments(parser, tiny=False)
    args = parser.parse_args(argv)
    from diffusers import AutoencoderKLWan

    device = torch.device(args.device)
    vae = AutoencoderKLWan().to(device).eval().requires_grad_(False)
    rows = []
    for resolution in args.resolutions:
        height, width = SIZES[resolution]
        latents = torch.randn(1, 16, args.frames, height // 8, width // 8, device=device)
        for tiling in args.tilings:
            if tiling == "none":
                vae.disable_tiling()
            elif tiling == "default":
                vae.enable_tiling()
            else:
                size = int(tiling)
                vae.enable_tiling(
                    tile_sample_min_height=size,
                    tile_sample_min_width=size,
                    tile_sample_stride_height=size - 64,
                    tile_sample_stride_width=size - 64,
                )
            sync(device)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with torch.no_grad():
                vae.decode(latents).sample
            sync(device)
            rows.append(
                dict(
                    resolution=resolution,
                    size=[height, width],
                    latent_frames=args.frames,
                    tiling=tiling,
                    s=round(time.perf_counter() - start, 2),
                    peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
                    date=time.strftime("%Y-%m-%d"),
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
