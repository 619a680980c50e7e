#!/usr/bin/env python
"""GGUF transformers at real width: ms per forward, peak GPU memory and output error against bf16, in one run.

    PYTHONPATH=src:. python bench/bench_gguf.py --cases reference:720P avatar:480P --layers 2 \
        --weights bf16 fp8_weight_only fp8_low_vram gguf_q8_0 gguf_q4_0 gguf_q4_k gguf_q4_0_group \
        --json bench/results/2026-11-29_h200_gguf.json

Each case builds the real-width transformer (5120 wide, 40 heads, FFN 13824; avatar with its audio layers) with
`--layers` blocks and random bf16 weights, writes them as community-layout GGUF files (city96's layout: original
Wan-native names for the avatar, diffusers-style names for reference, vectors / modulation / patch embedding in F32;
Q8_0 and Q4_0 quantised with `gguf.quants`, Q4_K as random valid blocks since `gguf` cannot quantise K-quants: its
error column is meaningless, its time and memory are not), loads them with `from_single_file(...,
GGUFQuantizationConfig(compute_dtype=bf16))` and times the forward of one denoising step (the shapes of
bench_transformer.py). Weights settings:

  bf16             resident, eager (the reference of the error column)
  fp8_weight_only  torchao float8 weight-only on the block linears, resident, eager
  fp8_low_vram     the `--low-vram` preset: fp8_weight_only + block-level group offload (CUDA-stream prefetch)
  gguf_q8_0 / gguf_q4_0 / gguf_q4_k  GGUF linears dequantised on the fly, resident
  gguf_q4_0_group  the `--low-vram` preset with a Q4_0 GGUF transformer (group offload, no FP8)
  gguf_q8_0_compile  gguf_q8_0 with `compile_repeated_blocks(fullgraph=True)`

Per-layer scaling to the full 40 layers: time ~ layers; a resident peak grows by one block's weights per layer;
a group-offloaded peak does not grow (one block on the GPU at a time). Both extrapolations are in the rows.
`--tiny --device cpu` checks the script on the tiny configs.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch


ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from bench_transformer import SHAPES, add_run_arguments, build_model, make_inputs, sync, write_json  # noqa: E402

from skyreels_diffusers.models import SkyReelsV3Transformer3DModel  # noqa: E402
from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS, TRANSFORMER_CONFIGS  # noqa: E402
from skyreels_diffusers.optimization import quantize_transformer  # noqa: E402


WEIGHTS = (
    "bf16",
    "fp8_weight_only",
    "fp8_low_vram",
    "gguf_q8_0",
    "gguf_q4_0",
    "gguf_q4_k",
    "gguf_q4_0_group",
    "gguf_q8_0_compile",
)
FULL_LAYERS = 40


def gguf_file(model, variant: str, qtype_name: str, folder: Path) -> Path:
    """The model's weights as a community-layout GGUF file of `qtype_name`."""
    from tests.conversion.community_files import T, wan_native_state, write_community_gguf

    path = folder / f"{variant}-{qtype_name}.gguf"
    if not path.exists():
        state = (
            wan_native_state(model)
            if variant == "avatar"
            else {k: v.detach().cpu() for k, v in model.state_dict().items()}
        )
        write_community_gguf(path, {k: v.float().cpu() for k, v in state.items()}, getattr(T, qtype_name.upper()))
    return path


def prepare(weights: str, base, variant: str, cfg: dict, device: torch.device, folder: Path):
    """A model for one weights setting, built from the bf16 `base` model's weights."""
    group = weights in ("fp8_low_vram", "gguf_q4_0_group")
    if weights.startswith("gguf"):
        from diffusers import GGUFQuantizationConfig

        qtype = "_".join(weights.split("_")[1:3])
        path = gguf_file(base, variant, qtype, folder)
        model = SkyReelsV3Transformer3DModel.from_single_file(
            path, variant=variant, config=cfg, quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16)
        )
    else:
        model = build_model(cfg, torch.device("cpu"))
        model.load_state_dict(base.state_dict())
        if weights != "bf16":
            model.to(device)
            quantize_transformer(model, "fp8_weight_only")
    model.set_attention_backend("native")
    if group:
        model.to("cpu")
        stream = device.type == "cuda"
        model.enable_group_offload(
            device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=stream,
            record_stream=stream,
        )
    else:
        model.to(device)
    if weights.endswith("compile"):
        model.compile_repeated_blocks(fullgraph=True)
    return model.eval().requires_grad_(False)


def block_gib(model) -> float:
    """GiB of one transformer block's stored weights (GGUF: the quantised bytes)."""
    tensors = list(model.blocks[0].parameters()) + list(model.blocks[0].buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


@torch.no_grad()
def measure(model, inputs, device, warmup: int, repeats: int):
    start = time.perf_counter()
    for _ in range(warmup):
        model(**inputs)
    sync(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = model(**inputs).sample
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return sorted(times)[len(times) // 2], peak, out.float(), warmup_s


def run_case(variant: str, resolution: str, args, device, folder: Path, rows: list) -> None:
    configs = TINY_TRANSFORMER_CONFIGS if args.tiny else TRANSFORMER_CONFIGS
    cfg = {**configs[variant], "num_layers": args.layers}
    frames, height, width = (5, 8, 12) if args.tiny else SHAPES[(variant, resolution)]
    base = build_model(cfg, torch.device("cpu"))
    inputs = make_inputs(variant, frames, height, width, cfg, device)
    reference = None
    for weights in args.weights:
        if args.budget_s and time.perf_counter() - args.started > args.budget_s:
            rows.append({"variant": variant, "resolution": resolution, "weights": weights, "skipped": "time budget"})
            continue
        try:
            t0 = time.perf_counter()
            model = prepare(weights, base, variant, cfg, device, folder)
            load_s = time.perf_counter() - t0
            ms, peak, out, warmup_s = measure(model, inputs, device, args.warmup, args.repeats)
        except Exception as error:  # noqa: BLE001 - a setting that cannot run here is reported, not fatal
            rows.append(
                {
                    "variant": variant,
                    "resolution": resolution,
                    "weights": weights,
                    "error": f"{type(error).__name__}: {str(error)[:300]}",
                }
            )
            print(json.dumps(rows[-1]), flush=True)
            model = None
            gc.collect()
            torch.cuda.empty_cache() if device.type == "cuda" else None
            continue
        reference = out if reference is None else reference
        per_block = block_gib(model)
        grouped = weights in ("fp8_low_vram", "gguf_q4_0_group")
        extra_layers = FULL_LAYERS - args.layers
        rows.append(
            {
                "variant": variant,
                "resolution": resolution,
                "weights": weights,
                "layers": args.layers,
                "latent": [frames, height, width],
                "ms_per_forward": round(ms, 1),
                "peak_gib": round(peak, 2),
                "block_weights_gib": round(per_block, 3),
                "load_s": round(load_s, 1),
                "warmup_s": round(warmup_s, 1),
                "rel_error_vs_bf16": round(float((out - reference).norm() / reference.norm()), 5),
                "ms_40_layers": round(ms * FULL_LAYERS / args.layers, 0),
                "peak_gib_40_layers": round(peak if grouped else peak + extra_layers * per_block, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        write_json(args.json, {"rows": rows})
        del model, out
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
    del base, inputs, reference


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["reference:720P"],
        help="variant:resolution pairs (reference / avatar; the resolutions of bench_transformer)",
    )
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (times are scaled to 40)")
    parser.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=WEIGHTS)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=0.0, help="skip the remaining settings after this long")
    add_run_arguments(parser)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.started = time.perf_counter()
    cases = [tuple(case.split(":")) for case in args.cases]
    bad = [case for case in cases if case[0] not in ("reference", "avatar") or case not in SHAPES]
    if bad:
        raise SystemExit(f"--cases: {bad} not among {sorted(k for k in SHAPES if k[0] != 'extension')}")
    device = torch.device(args.device)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        for variant, resolution in cases:
            run_case(variant, resolution, args, device, Path(folder), rows)
    env = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }
    print(
        "\n| case | weights | ms/forward (40 layers) | vs bf16 | vs fp8 low-VRAM | peak GiB (40 layers) | rel. error |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "ms_per_forward" not in r:
            print(f"| {r['variant']} {r['resolution']} | {r['weights']} | {r.get('error') or r.get('skipped')} |")
            continue
        same = [
            x
            for x in rows
            if x.get("variant") == r["variant"] and x.get("resolution") == r["resolution"] and "ms_per_forward" in x
        ]
        base = next((x["ms_per_forward"] for x in same if x["weights"] == "bf16"), None)
        low = next((x["ms_per_forward"] for x in same if x["weights"] == "fp8_low_vram"), None)
        print(
            f"| {r['variant']} {r['resolution']} | {r['weights']} | {r['ms_40_layers']:.0f} | "
            f"{(r['ms_per_forward'] / base) if base else float('nan'):.2f}x | "
            f"{(r['ms_per_forward'] / low) if low else float('nan'):.2f}x | {r['peak_gib_40_layers']:.1f} | "
            f"{r['rel_error_vs_bf16']:.4f} |"
        )
    write_json(args.json, {"env": env, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
