#!/usr/bin/env python
"""Conversion and loading at real width: peak RSS and time of `convert_checkpoints.py repo`, then of loading the
converted folder, on a synthetic repository in the ORIGINAL video-extension layout.

    PYTHONPATH=src:. python bench/bench_conversion.py --work /tmp/conv --layers 2 --t5-layers 2 \
        --json bench/results/2026-11-29_cpu_conversion.json

The synthetic repo has the real shapes (transformer 5120 wide, 40 heads, FFN 13824, UMT5-XXL encoder with its
256384 x 4096 embedding, the Wan2.1 VAE) with random weights, but only `--layers` transformer blocks and
`--t5-layers` T5 blocks, so that it fits on a small disk; `shot_transformer/` links to `transformer/`'s files.
Every step runs in its own process under `/usr/bin/time` (peak RSS = "maximum resident set size"):

  convert            scripts/convert_checkpoints.py repo --task video_extension SRC DST
  load_transformer   SkyReelsV3Transformer3DModel.from_pretrained(DST/.../transformer, torch_dtype=bf16)
                     (default low_cpu_mem_usage=True), with low_cpu_mem_usage=False, and with device_map="cpu"
  load_pipeline      SkyReelsV3ExtensionPipeline.from_pretrained(DST/single_shot_extension, torch_dtype=bf16)
  single_file        SkyReelsV3Transformer3DModel.from_single_file(SRC/transformer shards, torch_dtype=bf16)

`--keep` leaves the work folder (deleted otherwise).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
T5_VOCAB, T5_DIM, T5_FF, T5_HEADS, T5_BUCKETS = 256384, 4096, 10240, 64, 32


def build(src: Path, layers: int, t5_layers: int) -> None:
    """The synthetic original repo (random bf16 weights, real shapes)."""
    import torch
    from diffusers import AutoencoderKLWan
    from safetensors.torch import save_file

    from skyreels_diffusers.app.tiny import tiny_tokenizer
    from skyreels_diffusers.loaders.transformer_conversion import expected_state_shapes
    from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
    from skyreels_diffusers.models.configs import TRANSFORMER_CONFIGS
    from tests.conversion.community_files import wan_native_state
    from tests.conversion.original_repos import _vae_key_to_original

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.bfloat16) * 0.02

    src.mkdir(parents=True)
    tiny_tokenizer().save_pretrained(src / "google" / "umt5-xxl")
    config = {**TRANSFORMER_CONFIGS["extension"], "num_layers": layers}
    wan = wan_native_state(
        {k: rand(*shape) for k, shape in expected_state_shapes(SkyReelsV3Transformer3DModel, config).items()}
    )
    (src / "transformer").mkdir()
    keys = sorted(wan)
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :]), start=1):
        save_file(
            {k: wan[k] for k in part},
            str(src / "transformer" / f"diffusion_pytorch_model-0000{i}-of-00002.safetensors"),
        )
    original_config = {
        "model_type": "t2v",
        "dim": 5120,
        "ffn_dim": 13824,
        "num_heads": 40,
        "num_layers": layers,
        "in_dim": 16,
        "out_dim": 16,
        "text_len": 512,
        "freq_dim": 256,
        "eps": 1e-6,
    }
    (src / "transformer" / "config.json").write_text(json.dumps(original_config))
    (src / "shot_transformer").mkdir()
    for file in (src / "transformer").iterdir():
        (src / "shot_transformer" / file.name).symlink_to(file)
    del wan
    t5 = {"token_embedding.weight": rand(T5_VOCAB, T5_DIM), "norm.weight": torch.ones(T5_DIM, dtype=torch.bfloat16)}
    for i in range(t5_layers):
        t5.update(
            {
                f"blocks.{i}.norm1.weight": torch.ones(T5_DIM, dtype=torch.bfloat16),
                f"blocks.{i}.norm2.weight": torch.ones(T5_DIM, dtype=torch.bfloat16),
                f"blocks.{i}.pos_embedding.embedding.weight": rand(T5_BUCKETS, T5_HEADS),
                f"blocks.{i}.ffn.gate.0.weight": rand(T5_FF, T5_DIM),
                f"blocks.{i}.ffn.fc1.weight": rand(T5_FF, T5_DIM),
                f"blocks.{i}.ffn.fc2.weight": rand(T5_DIM, T5_FF),
            }
        )
        t5.update({f"blocks.{i}.attn.{p}.weight": rand(T5_DIM, T5_DIM) for p in "qkvo"})
    torch.save(t5, src / "models_t5_umt5-xxl-enc-bf16.pth")
    del t5
    vae = AutoencoderKLWan()  # the Wan2.1 VAE's real configuration (base width 96)
    torch.save({_vae_key_to_original(k): v for k, v in vae.state_dict().items()}, src / "Wan2.1_VAE.pth")


LOAD_SNIPPETS = {
    "load_transformer": "SkyReelsV3Transformer3DModel.from_pretrained(T, torch_dtype=torch.bfloat16)",
    "load_transformer_no_low_cpu_mem": (
        "SkyReelsV3Transformer3DModel.from_pretrained(T, torch_dtype=torch.bfloat16, low_cpu_mem_usage=False)"
    ),
    "load_transformer_device_map_cpu": (
        "SkyReelsV3Transformer3DModel.from_pretrained(T, torch_dtype=torch.bfloat16, device_map='cpu')"
    ),
    "load_pipeline": "SkyReelsV3ExtensionPipeline.from_pretrained(P, torch_dtype=torch.bfloat16)",
    "single_file": "SkyReelsV3Transformer3DModel.from_single_file(S, torch_dtype=torch.bfloat16)",
}


def timed(name: str, command: list[str], rows: list, gb: float) -> None:
    """Run `command` under /usr/bin/time; record wall time and peak RSS."""
    report = Path(f"/tmp/bench_conversion_{name}.time")
    start = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-f", "%M %e", "-o", str(report), *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    rss_kib, _ = report.read_text().split()[-2:]
    row = {
        "step": name,
        "ok": result.returncode == 0,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(int(rss_kib) / 2**20, 2),
        "gb": round(gb, 2),
        "s_per_gb": round(wall / gb, 2) if gb else None,
    }
    if result.returncode:
        row["stderr"] = result.stderr[-600:]
    rows.append(row)
    print(json.dumps(row), flush=True)


def folder_gb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink()) / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="work folder (created; must not exist)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--t5-layers", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    work = Path(args.work)
    src, dst = work / "src", work / "dst"
    rows: list[dict] = []
    py = [sys.executable, "-c"]
    try:
        start = time.perf_counter()
        code = (
            f"from pathlib import Path; from bench.bench_conversion import build; "
            f"build(Path({str(src)!r}), {args.layers}, {args.t5_layers})"
        )
        subprocess.run([*py, code], cwd=ROOT, check=True)
        src_gb = folder_gb(src)
        print(f"built {src} ({src_gb:.2f} GB) in {time.perf_counter() - start:.0f} s", flush=True)
        timed(
            "convert",
            [
                sys.executable,
                "scripts/convert_checkpoints.py",
                "repo",
                "--task",
                "video_extension",
                str(src),
                str(dst),
            ],
            rows,
            0.0,
        )
        rows[-1]["gb"] = round(folder_gb(dst), 2)  # what was written (two pipeline folders)
        rows[-1]["s_per_gb"] = round(rows[-1]["wall_s"] / rows[-1]["gb"], 2)
        print(json.dumps(rows[-1]), flush=True)
        paths = {
            "T": dst / "single_shot_extension" / "transformer",
            "P": dst / "single_shot_extension",
            "S": src / "transformer",
        }
        sizes = {"T": folder_gb(paths["T"]), "P": folder_gb(paths["P"]), "S": folder_gb(paths["S"])}
        for name, snippet in LOAD_SNIPPETS.items():
            key = snippet.split("(")[1][0]
            code = (
                "import torch; from skyreels_diffusers import SkyReelsV3ExtensionPipeline; "
                "from skyreels_diffusers.models import SkyReelsV3Transformer3DModel; "
                f"{key} = {str(paths[key])!r}; m = {snippet}"
            )
            timed(name, [*py, code], rows, sizes[key])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    env = {
        "machine": "CPU host (2 shared cores, 24 GiB RAM)",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
        "layers": args.layers,
        "t5_layers": args.t5_layers,
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
