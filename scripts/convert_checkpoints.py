#!/usr/bin/env python
"""Convert original SkyReels-V3 checkpoints into the diffusers layout of skyreels-diffusers.

    python scripts/convert_checkpoints.py transformer --variant {reference,extension,avatar} SRC DST
        [--dtype bf16|fp32] [--max-shard-size 5GB]

    python scripts/convert_checkpoints.py repo --task {reference_to_video,video_extension,talking_avatar} SRC DST
        [--push-to-hub REPO_ID] [--dtype bf16|fp32]

`transformer`: SRC is an original transformer folder (`config.json` + `*.safetensors`; extension and avatar in Wan-native keys,
reference in diffusers keys). DST becomes a folder that `SkyReelsV3Transformer3DModel.from_pretrained(DST)` loads
strictly. Any key that does not fit the model is an error naming the keys, and nothing is written.

`repo`: SRC is a whole original Hugging Face repo (downloaded); DST becomes a diffusers pipeline folder that both
`DiffusionPipeline.from_pretrained(DST)` (after `import skyreels_diffusers`) and the task class load. The
video-extension repo yields two: DST/single_shot_extension and DST/shot_switching_extension.

Output is written into a hidden temporary folder next to DST (`.NAME.HOST.PID.RANDOM.tmp`) and renamed at the end;
an error, Ctrl-C or SIGTERM removes it (exit 1, 130, 143), and a folder left by a killed run (SIGKILL) is removed by
the next conversion into the same parent folder.
"""

from __future__ import annotations

import argparse
import sys

import torch

from skyreels_diffusers.app.tasks import REPOS, TASKS


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    transformer = sub.add_parser("transformer", help="convert one transformer folder")
    transformer.add_argument("--variant", required=True, choices=sorted({t.variant for t in TASKS.values()}))
    transformer.add_argument("src")
    transformer.add_argument("dst")
    transformer.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    transformer.add_argument("--max-shard-size", default="5GB")
    repo = sub.add_parser("repo", help="convert a whole original repo into pipeline folder(s)")
    repo.add_argument("--task", required=True, choices=list(REPOS))
    repo.add_argument("src")
    repo.add_argument("dst")
    repo.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="transformer and text encoder dtype")
    repo.add_argument("--max-shard-size", default="5GB")
    repo.add_argument("--push-to-hub", default=None, metavar="REPO_ID")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from skyreels_diffusers.app.convert import convert_repo, convert_transformer

    try:
        if args.command == "transformer":
            convert_transformer(
                args.src, args.dst, args.variant, dtype=DTYPES.get(args.dtype), max_shard_size=args.max_shard_size
            )
            written = [args.dst]
        else:
            written = convert_repo(
                args.task,
                args.src,
                args.dst,
                dtype=DTYPES[args.dtype],
                max_shard_size=args.max_shard_size,
                push_to_hub=args.push_to_hub,
            )
    except (KeyError, ValueError, OSError, NotImplementedError) as error:  # OSError: a file destination, a full disk
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written (the temporary folder is removed)", file=sys.stderr)
        return 130
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
