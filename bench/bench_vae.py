#!/usr/bin/env python
"""Wan2.1 VAE encode and decode at real size (random weights: the cost does not depend on them): time, peak GPU
memory and, per dtype, the difference to the float32 VAE on the same input. Chooses the low-VRAM preset's tiling and
measures what a bfloat16 VAE, cuDNN's autotuner or channels-last (NDHWC) tensors would save the talking avatar's
windows.

    PYTHONPATH=src python bench/bench_vae.py --resolutions 540P 720P --tilings none default 512 --json vae.json
    PYTHONPATH=src python bench/bench_vae.py --avatar --resolutions 480P 720P --encode-frames 81 --frames 18 \
        --dtypes float32 bfloat16 --cudnn-benchmark off on --channels-last off on --json vae_avatar.json

`default` = diffusers' tiles (256 px, stride 192); `512` = 512 px tiles with stride 448. `--avatar`: the talking
avatar's sizes (480 x 832 at 480P); one of its windows encodes an 81-frame conditioning video and decodes 18 latent
frames. The error columns are relative L2 and max |difference| against the float32 VAE (no autotuner, NCDHW) (on
[-1, 1] pixels for decode, on latents for encode); random weights give an order of magnitude, not the trained VAE's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import AVATAR_SIZES, SIZES  # noqa: E402
from bench_transformer import add_run_arguments, device_name, sync, write_json  # noqa: E402


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TINY_SIZE = (32, 48)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", nargs="+", default=["540P", "720P"], choices=sorted(SIZES))
    parser.add_argument("--avatar", action="store_true", help="the talking avatar's sizes (480 x 832 at 480P)")
    parser.add_argument("--tilings", nargs="+", default=["none", "default", "512"])
    parser.add_argument("--frames", type=int, default=31, help="latent frames to decode (31 = 121 video frames)")
    parser.add_argument("--encode-frames", type=int, default=0, help="video frames to encode (0: no encode)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=list(DTYPES))
    parser.add_argument("--cudnn-benchmark", nargs="+", default=["off"], choices=["off", "on"])
    parser.add_argument(
        "--channels-last", nargs="+", default=["off"], choices=["off", "on"], help="NDHWC weights/inputs"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats after one warm-up (median reported)")
    add_run_arguments(parser, tiny=True)
    return parser


def set_tiling(vae, tiling: str) -> None:
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


def timed(work, device: torch.device, repeats: int) -> tuple[torch.Tensor, float, float | None]:
    """`work()`'s output (float32, on the host), the median seconds of `repeats` runs after a warm-up, and its peak
    GiB: that of one call alone (no earlier output is held on the device while it runs)."""
    with torch.no_grad():
        work()  # warm-up, its output dropped
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds = []
        for _ in range(max(repeats, 1)):
            output = None
            sync(device)
            start = time.perf_counter()
            output = work()
            sync(device)
            seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return output.float().cpu(), statistics.median(seconds), peak


def difference(output: torch.Tensor, reference: torch.Tensor | None) -> dict:
    if reference is None:
        return {}
    delta = (output - reference).float()
    return {
        "rel_l2": float(delta.norm() / reference.norm().clamp_min(1e-12)),
        "max_abs": float(delta.abs().max()),
    }


def configure(vae, tiling: str, dtype: str, benchmark: str, channels_last: str) -> torch.memory_format:
    """Set the VAE up for one setting; returns the memory format its inputs take."""
    set_tiling(vae, tiling)
    torch.backends.cudnn.benchmark = benchmark == "on"
    vae.to(DTYPES[dtype])
    formats = {4: torch.channels_last, 5: torch.channels_last_3d} if channels_last == "on" else {}
    for parameter in vae.parameters():  # Module.to would give 4-D weights the 5-D format too
        parameter.data = parameter.data.contiguous(memory_format=formats.get(parameter.dim(), torch.contiguous_format))
    return formats.get(5, torch.contiguous_format)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from diffusers import AutoencoderKLWan

    device = torch.device(args.device)
    if args.tiny:
        from skyreels_diffusers.app.tiny import tiny_vae

        vae = tiny_vae().to(device)
    else:
        vae = AutoencoderKLWan().to(device).eval()
    vae.requires_grad_(False)
    sizes = AVATAR_SIZES if args.avatar else SIZES
    generator = torch.Generator(device).manual_seed(0)
    works = {"decode": lambda x: vae.decode(x).sample, "encode": lambda x: vae.encode(x).latent_dist.mode()}
    settings = list(itertools.product(args.tilings, args.dtypes, args.cudnn_benchmark, args.channels_last))
    rows, references = [], {}
    for resolution in args.resolutions:
        height, width = TINY_SIZE if args.tiny else sizes[resolution]
        shape = (1, vae.config.z_dim, args.frames, height // 8, width // 8)
        inputs = {"decode": torch.randn(shape, device=device, generator=generator)}
        if args.encode_frames:
            shape = (1, 3, args.encode_frames, height, width)
            inputs["encode"] = torch.rand(shape, device=device, generator=generator) * 2 - 1
        for tiling, dtype, benchmark, channels_last in settings:
            layout = configure(vae, tiling, dtype, benchmark, channels_last)
            for name, tensor in inputs.items():
                tensor = tensor.to(vae.dtype, memory_format=layout)
                output, seconds, peak = timed(lambda: works[name](tensor), device, args.repeats)
                key = (resolution, tiling, name)
                is_reference = (dtype, benchmark, channels_last) == ("float32", "off", "off")
                if is_reference:
                    references[key] = (output, seconds)
                reference, reference_s = references.get(key, (None, None))
                rows.append(
                    dict(
                        resolution=resolution,
                        size=[height, width],
                        work=name,
                        frames=tensor.shape[2],
                        tiling=tiling,
                        dtype=dtype,
                        cudnn_benchmark=benchmark,
                        channels_last=channels_last,
                        s=round(seconds, 3),
                        peak_gib=None if peak is None else round(peak, 2),
                        speedup=None if reference_s is None else round(reference_s / seconds, 3),
                        **({} if is_reference else difference(output, reference)),
                        card=device_name(device),
                        date=time.strftime("%Y-%m-%d"),
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
    torch.backends.cudnn.benchmark = False
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
