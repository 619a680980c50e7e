#!/usr/bin/env python
"""What the network carries per denoising step under context parallelism (and `--shard-weights`), from the shapes:
no GPU, no weights (the parameter bytes come from the model built on the meta device).

    PYTHONPATH=src python bench/parallel_traffic.py                       # the table of docs/parallel.md
    PYTHONPATH=src python bench/parallel_traffic.py --json traffic.json

Per transformer forward (one per step: these checkpoints run without CFG), what each rank receives:

* Ulysses (degree U, inside diffusers' templated attention): per self-attention, all-to-alls of q, k, v before the
  kernel and of the output after it; each rank sends and receives `(U - 1) / U` of its local tensors (its
  `N / (U R)` tokens x all heads), i.e. `4 (U - 1) N H D b / (U^2 R)` bytes per layer.
* Ring (degree R; diffusers' ring all-gathers k and v over the ring group, then merges the partial softmaxes):
  per self-attention `2 (R - 1) (N / R) (H / U) D b` bytes.
* `--shard-weights` (FSDP2 over all W = U R ranks): every unit's parameters are all-gathered before it runs:
  `(W - 1) / W` of the model's bytes per forward (the few parameters kept whole on every rank excepted).
* The output gather of the `_cp_plan` (the last layer's `N x 64` values): `(W - 1) / W` of it; the inputs, RoPE
  tables and conditions are split locally (no traffic).

Once per run, not per step: the encoders' embeddings broadcast from rank 0 (text: 512 x 4096 floats, 8 MB) and
the parallel VAE's all-gather of the decoded tiles (each rank receives the others' tiles: about the video's float32
size). With G GPUs per node, ranks `[k G, (k + 1) G)` share node k; Ulysses groups are consecutive ranks and ring
groups stride U (diffusers' mesh is (ring, ulysses)), so Ulysses inside a node and ring across nodes keeps the
all-to-alls on NVLink. `cross_node` is the part of each rank's bytes that comes from another node.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass


# case: (variant, tokens per forward, description); tokens = latent frames x (H / 16) x (W / 16)
CASES = {
    "reference_720p": ("reference", 35 * 45 * 80, "5-s 720P reference (31 + 4 reference latent frames)"),
    "extension_720p": ("extension", 40 * 45 * 80, "5-s 720P extension chunk (7 condition + 33 latent frames)"),
    "avatar_480p": ("avatar", 21 * 30 * 52, "avatar 480P window (81 frames = 21 latent frames)"),
    "avatar_720p": ("avatar", 21 * 45 * 80, "avatar 720P window"),
}
# (ulysses, ring, GPUs per node)
LAYOUTS = [(2, 1, 1), (2, 1, 2), (4, 1, 4), (2, 2, 2), (4, 1, 2), (8, 1, 8), (4, 2, 4), (8, 1, 4), (2, 4, 2)]
OUTPUT_CHANNELS = 64  # patch 1 x 2 x 2 x 16 latent channels
BF16 = 2  # bytes per value


@dataclass(frozen=True)
class Model:
    layers: int
    heads: int
    head_dim: int
    total_bytes: int  # parameters as loaded (bf16, fp32 `_keep_in_fp32_modules`)
    whole_bytes: int  # parameters `--shard-weights` keeps whole on every rank


def model_of(variant: str) -> Model:
    """The real transformer's sizes and parameter bytes (built on the meta device)."""
    import torch

    from skyreels_diffusers.models import SkyReelsV3Transformer3DModel
    from skyreels_diffusers.models.configs import TRANSFORMER_CONFIGS
    from skyreels_diffusers.parallel.sharding import sharding_plan

    config = TRANSFORMER_CONFIGS[variant]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = SkyReelsV3Transformer3DModel(**config)
    finally:
        torch.set_default_dtype(previous)
    keep = set(model._keep_in_fp32_modules)
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()
    plan = sharding_plan(model, 1)
    return Model(
        config["num_layers"],
        config["num_attention_heads"],
        config["attention_head_dim"],
        plan["total_bytes"],
        plan["whole_bytes"],
    )


def peers(rank: int, ulysses: int, ring: int) -> tuple[list[int], list[int]]:
    """The other ranks of `rank`'s Ulysses group (consecutive ranks) and of its ring group (stride `ulysses`)."""
    base = rank - rank % ulysses
    ulysses_group = [base + i for i in range(ulysses)]
    ring_group = [rank % ulysses + ulysses * j for j in range(ring)]
    return [r for r in ulysses_group if r != rank], [r for r in ring_group if r != rank]


def traffic(
    model: Model,
    tokens: int,
    ulysses: int,
    ring: int,
    gpus_per_node: int,
    shard_weights: bool,
    rank: int = 0,
    value_bytes: int = BF16,
    output_channels: int = OUTPUT_CHANNELS,
) -> dict:
    """Bytes `rank` receives per forward, by kind (`<kind>_bytes`), their total and how many cross nodes
    (activations of `value_bytes` each)."""
    world = ulysses * ring
    width = model.heads * model.head_dim * value_bytes  # bytes of one token's q (or k, v, out) over all heads
    ulysses_peers, ring_peers = peers(rank, ulysses, ring)
    node = rank // gpus_per_node
    remote = lambda group: sum(1 for r in group if r // gpus_per_node != node)  # noqa: E731
    per_peer = {
        # per layer: q, k, v, out; to each peer 1/U of the local N/(U R) tokens
        "ulysses": model.layers * 4 * tokens * width / (ulysses * ulysses * ring),
        # per layer: k and v of N/R tokens and H/U heads
        "ring": model.layers * 2 * tokens * width / (ring * ulysses),
        "fsdp": (model.total_bytes - model.whole_bytes) / world if shard_weights else 0.0,
        "output_gather": tokens * output_channels * value_bytes / world,
    }
    everyone = [r for r in range(world) if r != rank]
    groups = {"ulysses": ulysses_peers, "ring": ring_peers, "fsdp": everyone, "output_gather": everyone}
    row = {f"{kind}_bytes": per_peer[kind] * len(groups[kind]) for kind in per_peer}
    row["total_bytes"] = sum(row.values())
    row["cross_node_bytes"] = sum(per_peer[kind] * remote(groups[kind]) for kind in per_peer)
    return row


def table(cases: list[str], layouts: list[tuple[int, int, int]]) -> list[dict]:
    rows, models = [], {}
    for case in cases:
        variant, tokens, _ = CASES[case]
        model = models.setdefault(variant, model_of(variant))
        for ulysses, ring, per_node in layouts:
            for shard in (False, True):
                row = traffic(model, tokens, ulysses, ring, per_node, shard)
                rows.append(
                    {
                        "case": case,
                        "tokens": tokens,
                        "ulysses": ulysses,
                        "ring": ring,
                        "gpus_per_node": per_node,
                        "nodes": ulysses * ring // per_node,
                        "shard_weights": shard,
                        **{k: round(v) for k, v in row.items()},
                    }
                )
    return rows


def gb(value: float) -> str:
    return f"{value / 1e9:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = table(args.cases, LAYOUTS)
    print(
        "| case | Ulysses x ring | GPUs per node x nodes | Ulysses GB | ring GB | FSDP GB (--shard-weights) | "
        "total GB per rank per step | of which across nodes GB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for plain, sharded in zip(rows[::2], rows[1::2]):
        print(
            f"| {plain['case']} | {plain['ulysses']} x {plain['ring']} | {plain['gpus_per_node']} x "
            f"{plain['nodes']} | {gb(plain['ulysses_bytes'])} | {gb(plain['ring_bytes'])} | "
            f"{gb(sharded['fsdp_bytes'])} | {gb(plain['total_bytes'])} ({gb(sharded['total_bytes'])}) | "
            f"{gb(plain['cross_node_bytes'])} ({gb(sharded['cross_node_bytes'])}) |"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
