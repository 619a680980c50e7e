#!/usr/bin/env python
"""Convert original SkyReels-V3 checkpoints into the diffusers layout of skyreels-diffusers.

    python scripts/convert_checkpoints.py transformer --variant {reference,extension,avatar} SRC DST
        [--dtype bf16|fp32] [--max-shard-size 5GB]

SRC is an original transformer folder (`config.json` + `*.safetensors`; extension and avatar in Wan-native keys,
reference in diffusers keys). DST becomes a folder that `SkyReelsV3Transformer3DModel.from_pretrained(DST)` loads
strictly. Any key that does not fit the model is an error naming the keys, and nothing is written.
"""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    transformer = sub.add_parser("transformer", help="convert one transformer folder")
    transformer.add_argument("--variant", required=True, choices=["reference", "extension", "avatar"])
    transformer.add_argument("src")
    transformer.add_argument("dst")
    transformer.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    transformer.add_argument("--max-shard-size", default="5GB")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from skyreels_diffusers.conversion import convert_transformer

    try:
        if args.command == "transformer":
            convert_transformer(
                args.src, args.dst, args.variant, dtype=DTYPES.get(args.dtype), max_shard_size=args.max_shard_size
            )
    except (KeyError, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(args.dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
