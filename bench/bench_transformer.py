#!/usr/bin/env python
"""Real-size SkyReels-V3 transformer forward: time per forward and peak GPU memory, with random bf16 weights.

    PYTHONPATH=src python bench/bench_transformer.py --variants reference extension avatar \
        --resolutions 480P 720P --warmup 1 --repeats 3 --json out.json

Shapes are those of one denoising step of each task (see docs/performance.md):
reference 31 video + 4 reference latent frames; extension 7 condition + 33 new latent frames with per-frame
timesteps; avatar one 81-frame clip (21 latent frames) with CLIP tokens and audio windows. The floor is attention
FLOPs at the measured cuDNN rate plus linear FLOPs at the measured bf16 GEMM rate (shared/perf/roofline.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
from skyreels_diffusers.models.configs import TRANSFORMER_CONFIGS

# latent (frames, height, width) of one forward
SHAPES = {
    ("reference", "480P"): (35, 60, 106),  # 480x848, 31 video + 4 reference frames
    ("reference", "720P"): (35, 90, 160),  # 720x1280
    ("extension", "480P"): (40, 60, 106),  # 7 condition + 33 new frames
    ("extension", "720P"): (40, 90, 160),
    ("avatar", "480P"): (21, 60, 104),  # 480x832 (avatar 480P bucket), one 81-frame clip
    ("avatar", "720P"): (21, 90, 160),
}
ATTENTION_TFLOPS, GEMM_TFLOPS = 583.0, 750.0  # measured on one H100 (roofline.md)


def floor_ms(variant: str, frames: int, height: int, width: int, cfg: dict) -> float:
    tokens = frames * (height // 2) * (width // 2)
    dim, heads, head_dim, ffn, layers = (
        cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_attention_heads"],
        cfg["attention_head_dim"], cfg["ffn_dim"], cfg["num_layers"],
    )
    attention = 4 * tokens**2 * head_dim * heads
    linear = 2 * tokens * (6 * dim**2 + 2 * dim * ffn)
    if variant == "avatar":
        linear += 2 * tokens * 2 * dim**2  # audio attention q and out projections
        attention += 4 * tokens * (257 + cfg["audio_context_tokens"]) * head_dim * heads
    return layers * (attention / (ATTENTION_TFLOPS * 1e12) + linear / (GEMM_TFLOPS * 1e12)) * 1e3


def build_model(variant: str, device: torch.device) -> SkyReelsV3Transformer3DModel:
    """Random weights straight on the GPU in bf16, `_keep_in_fp32_modules` in fp32 (as `from_pretrained` gives)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = SkyReelsV3Transformer3DModel(**TRANSFORMER_CONFIGS[variant])
    finally:
        torch.set_default_dtype(previous)
    keep = set(model._keep_in_fp32_modules)
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()
    return model.eval().requires_grad_(False)


def make_inputs(variant: str, frames: int, height: int, width: int, cfg: dict, device, seed: int = 0) -> dict:
    g = torch.Generator(device).manual_seed(seed)
    inputs = {
        "hidden_states": torch.randn(1, cfg["in_channels"], frames, height, width, device=device, generator=g),
        "encoder_hidden_states": torch.randn(1, 512, 4096, device=device, generator=g, dtype=torch.bfloat16),
        "timestep": torch.tensor([937], device=device),
    }
    if variant == "extension":
        inputs["timestep"] = torch.tensor([[0] * 7 + [888] * (frames - 7)], device=device)
    if variant == "avatar":
        inputs["timestep"] = torch.tensor([956.58], device=device)
        inputs["encoder_hidden_states_image"] = torch.randn(1, 257, 1280, device=device, generator=g,
                                                            dtype=torch.bfloat16)
        inputs["audio_embeds"] = torch.randn(1, 4 * (frames - 1) + 1, 5, 12, 768, device=device, generator=g,
                                             dtype=torch.bfloat16)
    return inputs


@torch.no_grad()
def time_forward(model, inputs, warmup: int, repeats: int) -> tuple[list[float], float]:
    for _ in range(warmup):
        model(**inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = model(**inputs).sample
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    assert torch.isfinite(out.float()).all(), "non-finite output"
    return times, torch.cuda.max_memory_allocated() / 2**30


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["reference", "extension", "avatar"])
    parser.add_argument("--resolutions", nargs="+", default=["480P", "720P"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda")
    rows = []
    for variant in args.variants:
        cfg = TRANSFORMER_CONFIGS[variant]
        t0 = time.perf_counter()
        model = build_model(variant, device)
        params = sum(p.numel() for p in model.parameters())
        weights_gib = torch.cuda.memory_allocated() / 2**30
        print(f"[{variant}] {params / 1e9:.2f}B parameters, {weights_gib:.1f} GiB, built in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        for resolution in args.resolutions:
            frames, height, width = SHAPES[(variant, resolution)]
            inputs = make_inputs(variant, frames, height, width, cfg, device)
            times, peak = time_forward(model, inputs, args.warmup, args.repeats)
            median = sorted(times)[len(times) // 2]
            floor = floor_ms(variant, frames, height, width, cfg)
            row = dict(variant=variant, resolution=resolution, latent=[frames, height, width],
                       tokens=frames * (height // 2) * (width // 2), params_b=round(params / 1e9, 3),
                       ms=[round(t, 1) for t in times], median_ms=round(median, 1), floor_ms=round(floor, 1),
                       ratio_to_floor=round(median / floor, 3), peak_gib=round(peak, 2),
                       weights_gib=round(weights_gib, 2))
            rows.append(row)
            print(json.dumps(row), flush=True)
            del inputs
        del model
        torch.cuda.empty_cache()

    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version(), python=platform.python_version(),
               date=time.strftime("%Y-%m-%d"))
    print("\n| variant | res | tokens | ms/forward | floor ms | ratio | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['resolution']} | {r['tokens']} | {r['median_ms']:.0f} | {r['floor_ms']:.0f} | "
              f"{r['ratio_to_floor']:.2f} | {r['peak_gib']:.1f} |")
    print(json.dumps(env))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
