#!/usr/bin/env python
"""Sequence-parallel scaling of the SkyReels-V3 transformer: per-step time on N GPUs vs one, and the output's
difference from the one-GPU output (random bf16 weights at real size, same seed on every rank).

    # one GPU (baseline, writes the reference output) then N GPUs, in one call:
    PYTHONPATH=src python bench/bench_parallel.py --variants reference --resolutions 720P --out results/ && \
    PYTHONPATH=src torchrun --nproc_per_node 2 bench/bench_parallel.py --variants reference --resolutions 720P \
        --ulysses-degree 2 --out results/

Each run appends a JSON line per case to `<out>/parallel.jsonl`; rank 0 prints the table (speedup and efficiency
against the one-GPU line of the same case, max |diff| against its saved output).
`--tiny` runs the same code on the tiny configs (CPU with gloo under torchrun) to check the script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_transformer import SHAPES, TINY_SHAPE, build_model, device_name, make_inputs, sync  # noqa: E402

from skyreels_diffusers.models.configs import TINY_TRANSFORMER_CONFIGS, TRANSFORMER_CONFIGS  # noqa: E402
from skyreels_diffusers.parallel import (  # noqa: E402
    enable_context_parallel,
    enable_xfuser_parallel,
    init_distributed,
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["reference", "extension", "avatar"])
    parser.add_argument("--resolutions", nargs="+", default=["720P"])
    parser.add_argument("--ulysses-degree", type=int, default=1)
    parser.add_argument("--ring-degree", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--parallel-backend", choices=["diffusers", "xfuser"], default="diffusers")
    parser.add_argument("--attention-backend", default="native", help="diffusers backend (native = SDPA's choice)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="bench_parallel_out")
    args = parser.parse_args(argv)

    rank, world, device = init_distributed()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = TINY_TRANSFORMER_CONFIGS if args.tiny else TRANSFORMER_CONFIGS
    for variant in args.variants:
        for resolution in args.resolutions:
            cfg = configs[variant]
            frames, height, width = TINY_SHAPE if args.tiny else SHAPES[(variant, resolution)]
            if variant == "extension" and args.tiny:
                frames = 8  # per-frame timesteps split by frames: a multiple of 8 (as the pipeline's chunks)
            model = build_model(cfg, device)
            model.set_attention_backend(args.attention_backend)
            if world > 1:
                shard = enable_xfuser_parallel if args.parallel_backend == "xfuser" else enable_context_parallel
                shard(model, args.ulysses_degree, args.ring_degree)
            if args.compile:
                model.compile_repeated_blocks(fullgraph=args.parallel_backend != "xfuser")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            inputs = make_inputs(variant, frames, height, width, cfg, device)
            with torch.no_grad():
                for _ in range(args.warmup):
                    model(**inputs)
                times = []
                for _ in range(args.repeats):
                    sync(device)
                    if world > 1:
                        dist.barrier()
                    start = time.perf_counter()
                    output = model(**inputs).sample
                    sync(device)
                    times.append((time.perf_counter() - start) * 1e3)
            key = f"{variant}_{resolution}{'_tiny' if args.tiny else ''}"
            median = statistics.median(times)
            if rank == 0:
                reference_file = out / f"{key}_1gpu.pt"
                tokens = frames * height * width // 4
                row = dict(
                    variant=variant,
                    resolution=resolution,
                    tokens=tokens,
                    gpus=world,
                    backend=args.parallel_backend if world > 1 else "-",
                    ulysses=args.ulysses_degree,
                    ring=args.ring_degree,
                    even_split=tokens % world == 0,
                    compile=args.compile,
                    ms=[round(t, 1) for t in times],
                    median_ms=round(median, 1),
                    peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
                    device=device_name(device),
                    date=time.strftime("%Y-%m-%d"),
                )
                if world == 1:
                    torch.save(output.float().cpu(), reference_file)
                elif reference_file.is_file():
                    reference = torch.load(reference_file, weights_only=True)
                    diff = (output.float().cpu() - reference).abs()
                    row.update(
                        max_abs_diff=round(diff.max().item(), 5),
                        rel_diff=round((diff.norm() / reference.norm()).item(), 6),
                    )
                    rows = [json.loads(line) for line in (out / "parallel.jsonl").read_text().splitlines()]
                    baseline = [
                        r
                        for r in rows
                        if r["gpus"] == 1
                        and r["variant"] == variant
                        and r["resolution"] == resolution
                        and r["compile"] == args.compile
                    ]
                    if baseline:
                        speedup = baseline[-1]["median_ms"] / median
                        row.update(speedup=round(speedup, 3), efficiency=round(speedup / world, 3))
                with open(out / "parallel.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
            del model, inputs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
