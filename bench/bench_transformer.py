#!/usr/bin/env python
"""SkyReels-V3 transformer forward at real size with random bf16 weights: time per forward, peak GPU memory and
output error of each speed/memory mode, against the roofline floor.

    PYTHONPATH=src python bench/bench_transformer.py --variants reference --resolutions 480P \
        --modes baseline default compile fp8_weight_only fp8_dynamic group low_vram --json out.json

Modes (one fresh model each, same seed, same inputs):
  baseline         bf16, resident, eager, attention backend "native" (PyTorch SDPA picks its kernel)
  default          what the package does by default: eager, `fa3` on Hopper with FA3 installed, else SDPA's choice
  cudnn            baseline with diffusers' explicit `_native_cudnn` backend
  compile          baseline + `compile_repeated_blocks(fullgraph=True)`
  compile_fused    compile with `fuse_qkv_projections()` (one GEMM for q/k/v, one for each cross-attention k/v)
  fp8_weight_only  torchao float8 weight-only on the block linears + compile (the original's low-VRAM quantisation)
  fp8_dynamic      torchao float8 dynamic activation+weight (per-tensor) + compile
  fa3              baseline with FlashAttention-3 (`fa3` backend, exact; needs FA3 installed)
  compile_fa3      compile with `fa3`
  attn8            compile with the 8-bit Triton self-attention backend `triton_8bit` (bf16 linears)
  attn_fa3fp8      compile with FlashAttention-3 in FP8 (`fa3_fp8`, bf16 linears)
  fast             the `--fast` preset as it resolves here (`optimization.fast_preset`): the first usable 8-bit
                   attention of FAST_ATTENTION_BACKENDS + fp8_dynamic linears + compile (the row names the backend)
  fast_triton      `triton_8bit` + fp8_dynamic linears + compile (the preset with the Triton kernel)
  fast_fa3fp8      `fa3_fp8` + fp8_dynamic linears + compile (the preset with FA3's FP8 kernel)
  group            block-level group offload from pinned CPU memory with CUDA-stream prefetch (eager)
  low_vram         fp8_weight_only + group offload (eager)
  original         the original SkyReels-V3 transformer (with `--original PATH`, a checkout of its repository; it runs
                   first and all our modes then load its random weights, so errors are measured against it)
Error = ||out - out_baseline|| / ||out_baseline||. Shapes: one denoising step of each task (docs/performance.md).
`--tiny --device cpu` runs the same code on the tiny configs (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))

from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS, TRANSFORMER_CONFIGS
from skyreels_diffusers.optimization import quantize_transformer


# latent (frames, height, width) of one forward
SHAPES = {
    ("reference", "480P"): (35, 60, 106),  # 480x848, 31 video + 4 reference frames
    ("reference", "540P"): (35, 68, 120),  # 544x960
    ("reference", "720P"): (35, 90, 160),  # 720x1280
    ("extension", "480P"): (40, 60, 106),  # 7 condition + 33 new frames
    ("extension", "720P"): (40, 90, 160),
    ("avatar", "480P"): (21, 60, 104),  # 480x832 (avatar 480P bucket), one 81-frame clip
    ("avatar", "720P"): (21, 90, 160),
}
VARIANT_CHOICES = sorted({variant for variant, _ in SHAPES})
RESOLUTION_CHOICES = sorted({resolution for _, resolution in SHAPES})
TINY_SHAPE = (5, 8, 12)
ATTENTION_TFLOPS, GEMM_TFLOPS = 583.0, 750.0  # cuDNN SDPA / bf16 GEMM rates measured on one H100 (2026-11-27)
MODES = (
    "original",
    "baseline",
    "default",
    "cudnn",
    "compile",
    "compile_fused",
    "fp8_weight_only",
    "fp8_dynamic",
    "group",
    "low_vram",
    "fa3",
    "compile_fa3",
    "attn8",
    "attn_fa3fp8",
    "fast",
    "fast_triton",
    "fast_fa3fp8",
)
# mode -> (attention backend, FP8 linears, compiled blocks); "default" and "fast" resolve on the machine (`settings`)
MODE_SETTINGS = {
    "original": ("native", None, False),
    "baseline": ("native", None, False),
    "default": (None, None, False),
    "cudnn": ("_native_cudnn", None, False),
    "compile": ("native", None, True),
    "compile_fused": ("native", None, True),
    "fp8_weight_only": ("native", "fp8_weight_only", True),
    "fp8_dynamic": ("native", "fp8_dynamic", True),
    "group": ("native", None, False),
    "low_vram": ("native", "fp8_weight_only", False),
    "fa3": ("fa3", None, False),
    "compile_fa3": ("fa3", None, True),
    "attn8": ("triton_8bit", None, True),
    "attn_fa3fp8": ("fa3_fp8", None, True),
    "fast": (None, "fp8_dynamic", True),
    "fast_triton": ("triton_8bit", "fp8_dynamic", True),
    "fast_fa3fp8": ("fa3_fp8", "fp8_dynamic", True),
}


def check_shapes(variants: list[str], resolutions: list[str]) -> None:
    """Fail before any model is built when a variant has no shape at a requested resolution."""
    missing = [(v, r) for v in variants for r in resolutions if (v, r) not in SHAPES]
    if missing:
        raise SystemExit(f"--variants/--resolutions: no shape for {missing}; the shapes are {sorted(SHAPES)}")


def floor_ms(variant: str, frames: int, height: int, width: int, cfg: dict) -> float:
    tokens = frames * (height // 2) * (width // 2)
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    dim, ffn, layers = heads * head_dim, cfg["ffn_dim"], cfg["num_layers"]
    attention = 4 * tokens**2 * head_dim * heads
    linear = 2 * tokens * (6 * dim**2 + 2 * dim * ffn)
    if variant == "avatar":
        linear += 2 * tokens * 2 * dim**2  # audio attention q and out projections
        attention += 4 * tokens * (257 + cfg["audio_context_tokens"]) * head_dim * heads
    return layers * (attention / (ATTENTION_TFLOPS * 1e12) + linear / (GEMM_TFLOPS * 1e12)) * 1e3


def build_model(cfg: dict, device: torch.device, seed: int = 0) -> SkyReelsV3Transformer3DModel:
    """Random weights (same for a given seed) straight on `device` in bf16, `_keep_in_fp32_modules` in fp32 (as
    `from_pretrained(torch_dtype=bf16)` gives)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = SkyReelsV3Transformer3DModel(**cfg)
    finally:
        torch.set_default_dtype(previous)
    keep = set(model._keep_in_fp32_modules)
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()
    return model.eval().requires_grad_(False)


def make_inputs(variant: str, frames: int, height: int, width: int, cfg: dict, device, seed: int = 0) -> dict:
    g = torch.Generator(device).manual_seed(seed)
    text_dim = cfg["text_dim"]
    inputs = {
        "hidden_states": torch.randn(1, cfg["in_channels"], frames, height, width, device=device, generator=g),
        "encoder_hidden_states": torch.randn(1, 512, text_dim, device=device, generator=g, dtype=torch.bfloat16),
        "timestep": torch.tensor([937], device=device),
    }
    if variant == "extension":
        condition = min(7, frames - 1)
        inputs["timestep"] = torch.tensor([[0] * condition + [888] * (frames - condition)], device=device)
    if variant == "avatar":
        inputs["timestep"] = torch.tensor([956.58], device=device)
        inputs["encoder_hidden_states_image"] = torch.randn(
            1, 257, cfg["image_dim"], device=device, generator=g, dtype=torch.bfloat16
        )
        inputs["audio_embeds"] = torch.randn(
            1,
            cfg["audio_vae_scale"] * (frames - 1) + 1,
            cfg["audio_window"],
            cfg["audio_in_layers"],
            cfg["audio_in_dim"],
            device=device,
            generator=g,
            dtype=torch.bfloat16,
        )
    return inputs


class OriginalModel:
    """Callable like our model (`.sample`), running the original transformer with its own conventions."""

    def __init__(self, modules, variant: str, cfg: dict, device):
        from original_adapter import build_original

        self.variant = variant
        self.model = build_original(modules, variant, cfg, device)

    def __call__(self, **inputs):
        from types import SimpleNamespace

        from original_adapter import call_original

        return SimpleNamespace(sample=call_original(self.model, self.variant, inputs))


def settings(mode: str, device: torch.device) -> tuple[str, str | None, bool]:
    """(attention backend, FP8 linears, compiled) of a mode on this machine (`MODE_SETTINGS`)."""
    from skyreels_diffusers.models.attention_backends import (
        check_attention_backend_available,
        default_attention_backend,
    )
    from skyreels_diffusers.optimization import fast_preset

    backend, quantize, compile = MODE_SETTINGS[mode]
    if mode == "default":
        backend = default_attention_backend(device) or "native"
    if mode == "fast":
        backend = fast_preset()["attention_backend"]
    if device.type == "cuda":  # a missing FA3 fails the row before the model is built
        check_attention_backend_available(backend, download=False)
    return backend, quantize, compile


def prepare(mode: str, cfg: dict, device: torch.device, weights: dict | None = None) -> SkyReelsV3Transformer3DModel:
    backend, quantize, compile = settings(mode, device)
    model = build_model(cfg, device)
    if weights is not None:  # the original's weights (run with --original)
        model.load_state_dict(weights, strict=True)
    # diffusers keeps the active backend globally (reset_attention_backend leaves it): set it on every model
    model.set_attention_backend(backend)
    if quantize is not None:
        quantize_transformer(model, quantize)
    if mode == "compile_fused":
        model.fuse_qkv_projections()
    if compile:
        model.compile_repeated_blocks(fullgraph=True)
    if mode in ("group", "low_vram"):
        model.to("cpu")
        torch.cuda.empty_cache() if device.type == "cuda" else None
        stream = device.type == "cuda"
        model.enable_group_offload(
            device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=stream,
            record_stream=stream,
        )
    return model


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process so far (recompiles show up as jumps between modes)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU); every timing in bench/ brackets its work with it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device: torch.device) -> str:
    """The card's name for result rows ("cpu" off the GPU)."""
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"


@torch.no_grad()
def time_forward(model, inputs, warmup: int, repeats: int, device) -> tuple[list[float], float, torch.Tensor, float]:
    t0 = time.perf_counter()
    for _ in range(warmup):
        model(**inputs)
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, out = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = model(**inputs).sample
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    assert torch.isfinite(out.float()).all(), "non-finite output"
    return times, peak, out.float(), warmup_s


def add_run_arguments(parser: argparse.ArgumentParser, tiny: bool = True) -> None:
    """The arguments every bench script takes: `--device`, `--json` and, where the script has tiny configs,
    `--tiny`."""
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", default=None, help="write the results here (JSON)")
    if tiny:
        parser.add_argument("--tiny", action="store_true", help="tiny configs (checks the script on a CPU)")


def write_json(path: str | None, data) -> None:
    """Write `data` to `path` as indented JSON (nothing when no `--json` was given)."""
    if path:
        Path(path).write_text(json.dumps(data, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["reference", "extension", "avatar"], choices=VARIANT_CHOICES)
    parser.add_argument("--resolutions", nargs="+", default=["480P", "720P"], choices=RESOLUTION_CHOICES)
    parser.add_argument("--modes", nargs="+", default=["baseline"], choices=MODES)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="build only this many of the transformer blocks (a step is identical blocks plus a small head: ratios "
        "between modes carry over; ms do not)",
    )
    add_run_arguments(parser)
    parser.add_argument(
        "--original",
        default=None,
        metavar="PATH",
        help="a SkyReels-V3 checkout: time its transformer first, on the same weights",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.tiny:
        check_shapes(args.variants, args.resolutions)
    modules = None
    if args.original:
        from original_adapter import import_original

        modules = import_original(args.original)
        args.modes = ["original"] + [m for m in args.modes if m != "original"]

    device = torch.device(args.device)

    def save():
        write_json(args.json, {"rows": rows})

    configs = TINY_TRANSFORMER_CONFIGS if args.tiny else TRANSFORMER_CONFIGS
    rows = []
    for variant in args.variants:
        cfg = dict(configs[variant], **({"num_layers": args.layers} if args.layers else {}))
        for resolution in args.resolutions:
            frames, height, width = TINY_SHAPE if args.tiny else SHAPES[(variant, resolution)]
            inputs = make_inputs(variant, frames, height, width, cfg, device)
            reference = eager = weights = None
            floor = floor_ms(variant, frames, height, width, cfg)
            for mode in args.modes:
                try:
                    if mode == "original":
                        from original_adapter import our_state_dict

                        model = OriginalModel(modules, variant, cfg, device)
                        weights = {
                            k: v.detach().to("cpu", copy=True) for k, v in our_state_dict(model.model, variant).items()
                        }
                    else:
                        model = prepare(mode, cfg, device, weights)
                    times, peak, out, warmup_s = time_forward(model, inputs, args.warmup, args.repeats, device)
                except Exception as error:  # a mode that cannot run here is reported, not fatal
                    rows.append(
                        dict(
                            variant=variant,
                            resolution=resolution,
                            mode=mode,
                            error=f"{type(error).__name__}: {str(error)[:300]}",
                        )
                    )
                    print(json.dumps(rows[-1]), flush=True)
                    save()
                    model = None
                    gc.collect()
                    torch.cuda.empty_cache() if device.type == "cuda" else None
                    continue
                if reference is None:
                    reference = out
                if mode == "baseline":
                    eager = out
                median = sorted(times)[len(times) // 2]
                row = dict(
                    variant=variant,
                    resolution=resolution,
                    mode=mode,
                    latent=[frames, height, width],
                    tokens=frames * (height // 2) * (width // 2),
                    ms=[round(t, 1) for t in times],
                    median_ms=round(median, 1),
                    floor_ms=round(floor, 1),
                    ratio_to_floor=round(median / floor, 3),
                    peak_gib=round(peak, 2),
                    warmup_s=round(warmup_s, 1),
                    rel_error=round(((out - reference).norm() / reference.norm()).item(), 5),
                    layers=cfg["num_layers"],
                    compiled_graphs=graphs_compiled(),
                    attention_backend=None if mode == "original" else settings(mode, device)[0],
                )
                if eager is not None:  # against our eager bf16 forward (the first mode may be the original)
                    row["rel_error_vs_baseline"] = round(((out - eager).norm() / eager.norm()).item(), 5)
                rows.append(row)
                print(json.dumps(row), flush=True)
                save()
                del model, out
                gc.collect()
                torch.cuda.empty_cache() if device.type == "cuda" else None
            del inputs, reference, eager

    env = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        python=platform.python_version(),
        date=time.strftime("%Y-%m-%d"),
    )
    print("\n| variant | res | mode | ms/forward | vs baseline | floor ms | ratio to floor | peak GiB | rel. error |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = {}
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['resolution']} | {r['mode']} | failed: {r['error'][:80]} |")
            continue
        key = (r["variant"], r["resolution"])
        base.setdefault(key, r["median_ms"])
        print(
            f"| {r['variant']} | {r['resolution']} | {r['mode']} | {r['median_ms']:.0f} | "
            f"{base[key] / r['median_ms']:.2f}x | {r['floor_ms']:.0f} | {r['ratio_to_floor']:.2f} | "
            f"{r['peak_gib']:.1f} | {r['rel_error']:.4f} |"
        )
    print(json.dumps(env))
    write_json(args.json, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
